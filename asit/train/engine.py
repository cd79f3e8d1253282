"""The pretraining recipe: setup (data, model, optimiser, schedules), the training loop,
checkpoints, logging and export. ``scripts/pretrain.py`` is a thin wrapper around :class:`Pretrainer`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from asit.atomic_io import atomic_write_text
from asit.config import Config, config_to_dict, save_config
from asit.data.fbank import fbank_views
from asit.data.ring import BatchRing, RingCollate, resolve_ring_refs, ring_bytes, shared_memory_free
from asit.models import VIT_PRESETS, ASiTModel, StudentTeacher, build_asit
from asit.ops import expected_gmml_blocks, gmml_corrupt, gmml_shortfall, sample_gmml_blocks

from .checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    atomic_save,
    checkpoint_path,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    quarantine,
    rng_path,
    tensor_digest,
)
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .guard import NonFiniteGuard, StepResult
from .losses import ASiTLoss
from .metrics import MetricWriter, softmax_entropy, trim_log
from .schedules import cosine_schedule, teacher_temp_schedule
from .visualize import save_reconstruction_grid

__all__ = ["BadDataError", "EpochSampler", "Pretrainer", "ReplicaMismatchError",
           "bad_fraction_error"]

# Test hook (fault injection): ASIT_FAULT_AT_STEP=N makes rank ASIT_FAULT_RANK (default: the last rank)
# exit abruptly with os._exit(1) right after step N, once per run directory (a marker file there records
# that it fired, so the restarted workers run on). Used by the elastic-restart tests; unset in real runs.
FAULT_STEP_ENV = "ASIT_FAULT_AT_STEP"
FAULT_RANK_ENV = "ASIT_FAULT_RANK"

log = logging.getLogger(__name__)

# Config keys that may differ on resume without changing what is trained: where output goes, how often it is
# logged and checkpointed, guard thresholds, and speed settings that keep the batches and the maths (up to float
# rounding). A change of any other key is listed in a warning (data order, schedules, objective or numerics).
# Not free: train.sync_free (its GMML sampler draws blocks with a fixed candidate budget, so other masks from
# the same generator) and train.compile / compile_mode (Inductor draws drop-path's random numbers its own way).
RESUME_FREE_KEYS = frozenset({
    "name", "train.output_dir", "train.log_every", "train.progress", "train.checkpoint_every_steps",
    "train.keep_last", "train.keep_every_steps", "train.keep_every_epochs", "train.auto_resume",
    "train.verify_replicas", "train.image_every_epochs", "train.max_consecutive_nonfinite",
    "data.max_bad_fraction", "data.num_workers", "data.batch_ring", "data.fbank_on", "data.cache_dir",
    "model.attn_backend",
})


class EpochSampler(Sampler[int]):
    """Deterministic shuffled indices for one rank: a permutation seeded by ``(seed, epoch)``,
    split across ranks, with the first ``skip`` indices dropped (used to resume mid-epoch)."""

    def __init__(self, size: int, *, rank: int, world_size: int, seed: int, num_samples: int) -> None:
        self.size, self.rank, self.world = size, rank, world_size
        self.seed, self.num_samples = seed, num_samples
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)[self.rank :: self.world][: self.num_samples]
        return iter(perm[self.skip :].tolist())

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


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


class ReplicaMismatchError(RuntimeError):
    """The ranks' weights or centres differ at a checkpoint: the DDP replicas drifted apart."""


class _StudentStep(nn.Module):
    """What DDP wraps: the student applied to the corrupted global views and (v2) the clean local
    views, in one forward so DDP sees one graph per step."""

    def __init__(self, student: ASiTModel) -> None:
        super().__init__()
        self.student = student

    def forward(self, corrupted: torch.Tensor, local_views: torch.Tensor | None = None):
        out = self.student(corrupted)
        local_cls = None
        if local_views is not None:
            local_cls = self.student(local_views, with_recon=False)["cls_logits"]
        return out, local_cls


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's ``get_params_groups`` (the authors' rule): no weight decay on biases and other 1-D parameters
    (the norms' weights); every other parameter, [CLS] token and positional embedding included, is decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: ``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _rng_state(gmml_gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "gmml": gmml_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _fault_step(rank: int, world_size: int) -> int | None:
    """The step after which this rank simulates a crash (the ``ASIT_FAULT_AT_STEP`` test hook), or None."""
    raw = os.environ.get(FAULT_STEP_ENV)
    if not raw:
        return None
    target = int(os.environ.get(FAULT_RANK_ENV, str(world_size - 1)))
    return int(raw) if rank == target else None


def _inject_fault(run_dir: Path, step: int) -> None:
    """Exit this worker at once (no cleanup, like a segfault or an OOM kill), unless it already happened
    in this run directory."""
    marker = run_dir / f".fault_injected_step{step}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log.error("%s=%d: simulating a crash of this worker (test hook)", FAULT_STEP_ENV, step)
    os._exit(1)


class Pretrainer:
    """ASiT pretraining, single process or under torchrun (DDP).

    Usage::

        trainer = Pretrainer(load_config("demo_cpu"), resume=True)
        trainer.setup()
        trainer.train()
        trainer.cleanup()
    """

    def __init__(self, cfg: Config, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume
        self.run_dir = Path(cfg.train.output_dir)
        self.step = 0
        self.start_epoch = 0
        self.skip_batches = 0
        self.bad_inputs: Counter[str] = Counter()  # unusable clips per reason, all ranks, finished epochs
        # the current epoch's unusable clips per reason and clips loaded, summed over all ranks up to the last
        # reduction (_reduce_bad_counts: identical on every rank), and this rank's counts since then
        self.epoch_bad: Counter[str] = Counter()
        self.epoch_seen = 0
        self._pending_bad: Counter[str] = Counter()
        self._pending_seen = 0
        # the epoch's last step: its StepResult and a few (clean, corrupted, recon, mask) samples
        self._preview: tuple | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build everything; restore from the latest checkpoint when resuming."""
        cfg = self.cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.device = self.dist.device
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        self._setup_precision()
        self._setup_sync_free()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_schedules()
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if self.resume or (cfg.train.auto_resume and restarts > 0):
            if restarts and self.dist.is_main:
                log.warning("torchrun restarted the workers (restart %d): resuming from the latest good "
                            "checkpoint", restarts)
            self._restore()
        self._fault_at = _fault_step(self.dist.rank, self.dist.world_size)
        self.writer = MetricWriter(self.run_dir, enabled=self.dist.is_main)

    def _setup_precision(self) -> None:
        prec = self.cfg.train.precision
        if prec == "auto":  # reference mode: the authors' fp16 + loss scaling
            gpu = "fp16" if self.cfg.train.mode == "reference" else "bf16"
            prec = gpu if self.device.type == "cuda" else "fp32"
        if prec == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        self.precision = prec
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=prec == "fp16")

    def _setup_sync_free(self) -> None:
        """Whether the step runs sync-free (see ``train.sync_free``), its device-side counters, the budget
        check and, under NCCL, the gloo group for host-side agreement."""
        t, prec = self.cfg.train, self.precision
        if t.sync_free and prec == "fp16":
            raise ValueError("train.sync_free=true needs bf16 or fp32: fp16's loss scaler reads its overflow "
                             "flag on the host")
        self.sync_free = (t.mode == "fast" and self.device.type == "cuda" and prec != "fp16"
                          if t.sync_free is None else bool(t.sync_free))
        self.guard = NonFiniteGuard(
            self.device, sync_free=self.sync_free, max_consecutive=t.max_consecutive_nonfinite,
            distributed=self.dist.distributed, is_main=self.dist.is_main, checkpoints=self.run_dir / "checkpoints",
            candidate_budget=self.cfg.gmml.candidate_budget, events=lambda step, rec: self.writer.write(step, rec))
        g, d = self.cfg.gmml, self.cfg.data
        need = expected_gmml_blocks(d.target_frames, d.num_mel_bins, max(g.zero_ratio[1], g.alien_ratio),
                                    max_block_frac=g.max_block_frac, align=g.align) if self.sync_free else 0.0
        if 3 * need > g.candidate_budget and self.dist.is_main:
            advice = f"about {64 * math.ceil(3 * need / 64)}" if math.isfinite(need) else "far more"
            log.warning("gmml.candidate_budget=%d may be too small: these block settings need about %.0f blocks "
                        "for the largest target; short samples are counted as gmml_shortfall (raise the budget "
                        "to %s)", g.candidate_budget, need, advice)
        # sync-free under NCCL: ranks agree on host facts ("is every rank's batch usable?") over a gloo group,
        # so the agreement never waits for the GPU queue (on multi-node clusters gloo needs a reachable
        # interface: GLOO_SOCKET_IFNAME, see the README)
        self._host_group = None
        if self.sync_free and self.dist.distributed and dist.get_backend() != "gloo":
            self._host_group = dist.new_group(backend="gloo")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _setup_data(self) -> None:
        from asit.data import PretrainDataset, collate_pretrain, ensure_demo_dataset, load_manifest
        from asit.data.shards import ShardPretrainDataset, is_shard_source, open_shard_source

        d = self.cfg.data
        source = d.train_manifest
        if source == "demo":
            root = Path(d.cache_dir) / "demo" if d.cache_dir else None
            if self.dist.is_main:
                source = str(ensure_demo_dataset(root, num_clips=d.demo_clips, sample_rate=d.sample_rate,
                                                 seconds=d.demo_seconds, seed=self.cfg.train.seed))
            if self.dist.distributed:
                holder = [source]
                dist.broadcast_object_list(holder, src=0)
                source = holder[0]
        shards = open_shard_source(source) if is_shard_source(source) else None
        entries = load_manifest(source) if shards is None else []
        total = shards.total if shards is not None else len(entries)
        views = dict(sample_rate=d.sample_rate, crop_seconds=d.crop_seconds, num_views=d.num_views,
                     local_views=d.local_views, local_crop_seconds=d.local_crop_seconds, num_mel_bins=d.num_mel_bins,
                     target_frames=d.target_frames, local_target_frames=d.local_target_frames, mean=d.mean,
                     std=d.std, roll_prob=d.roll_prob, seed=self.cfg.train.seed)
        self.fbank_on = d.fbank_on
        if self.fbank_on == "auto":
            fast_cuda = self.device.type == "cuda" and self.cfg.train.mode == "fast"
            self.fbank_on = "device" if fast_cuda and d.backend == "torch" else "loader"
        per_rank = total // self.dist.world_size
        iters = per_rank // self.cfg.train.batch_size
        if iters == 0:
            raise ValueError(f"train.batch_size={self.cfg.train.batch_size} × {self.dist.world_size} "
                             "process(es) "
                             f"is larger than the dataset ({total} clips in {source})")
        if self.cfg.train.max_steps_per_epoch:
            iters = min(iters, self.cfg.train.max_steps_per_epoch)
        self.iters_per_epoch = iters
        if d.backend == "dali":
            if self.cfg.train.mode == "reference":
                raise ValueError("data.backend=dali runs in train.mode=fast")
            from asit.data.dali import DaliPretrainLoader

            # the loader counts its steps from the clips that pass its header check (every rank the same)
            self.loader = DaliPretrainLoader(
                shards if shards is not None else entries, batch_size=self.cfg.train.batch_size,
                shard_id=self.dist.rank, num_shards=self.dist.world_size,
                max_steps_per_epoch=self.cfg.train.max_steps_per_epoch or None,
                fbank=d.dali_fbank, device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
                num_threads=max(1, d.num_workers), all_gather=self._gather,
                **views)
            self.iters_per_epoch = self.loader.steps_per_epoch
            self.dataset, self.sampler = None, self.loader  # the loader takes set_epoch(epoch, skip)
            if self.dist.is_main:
                log.info("data: DALI, %d clips from %s (%d left out before training; %d file headers read by this "
                         "process), %d steps/epoch of %d per process", total, source,
                         sum(self.loader.excluded.values()), self.loader.headers_checked, self.iters_per_epoch,
                         self.cfg.train.batch_size)
            return
        views["fbank_on"] = self.fbank_on
        if shards is not None:
            self.dataset = ShardPretrainDataset(
                shards, rank=self.dist.rank, world_size=self.dist.world_size, batch_size=self.cfg.train.batch_size,
                samples_per_rank=iters * self.cfg.train.batch_size, shuffle_buffer=d.shuffle_buffer, **views)
            self.sampler = self.dataset.epoch_control()
        else:
            self.dataset = PretrainDataset(entries, **views)
            self.sampler = EpochSampler(len(entries), rank=self.dist.rank, world_size=self.dist.world_size,
                                        seed=self.cfg.train.seed, num_samples=iters * self.cfg.train.batch_size)
        workers = d.num_workers
        collate = collate_pretrain
        if self.cfg.train.mode == "reference":  # GMML on the CPU in the loader, like the authors' code
            from asit.data.gmml_cpu import ReferenceGMMLCollate

            g = self.cfg.gmml
            collate = ReferenceGMMLCollate(
                collate_pretrain, seed=self.cfg.train.seed, patch_size=self.cfg.model.patch_size,
                zero_ratio=g.zero_ratio, alien_ratio=g.alien_ratio, alien_prob=g.alien_prob,
                max_block_frac=g.max_block_frac, allow_self_alien=g.allow_self_alien)
        prefetch = 4
        self.ring = self._make_batch_ring(workers, prefetch, from_manifest=shards is None)
        if self.ring is not None:
            collate = RingCollate(collate_pretrain, self.ring)
        self.loader = DataLoader(
            self.dataset, batch_size=self.cfg.train.batch_size, num_workers=workers,
            sampler=self.sampler if shards is None else None,
            collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=True,
            persistent_workers=False, prefetch_factor=prefetch if workers > 0 else None,
            # own generator: creating a loader iterator must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.cfg.train.seed))
        if self.dist.is_main:
            log.info("data: %d clips from %s, %d steps/epoch of %d per process, fbank on the %s", total, source,
                     iters, self.cfg.train.batch_size, "device" if self.fbank_on == "device" else "loader workers")

    def _make_batch_ring(self, workers: int, prefetch: int, *, from_manifest: bool) -> BatchRing | None:
        """The loader's :class:`~asit.data.ring.BatchRing` (``data.batch_ring``), or None."""
        d = self.cfg.data
        wanted = d.batch_ring == "enabled" or (d.batch_ring == "auto" and self.device.type == "cuda")
        # not with shards: an exhausted shard worker lets the others run more than prefetch batches ahead
        if not (wanted and workers > 0 and from_manifest and self.cfg.train.mode == "fast"):
            return None
        shapes = {k: (self.cfg.train.batch_size, *shape) for k, shape in self.dataset.sample_shapes().items()}
        if d.batch_ring == "enabled":
            return self._log_ring(BatchRing(shapes, workers, prefetch))  # a clear error if it cannot fit
        # every process on this node allocates its own ring at about the same time: budget for all of them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        need, free = ring_bytes(shapes, workers, prefetch), shared_memory_free()
        if free is not None and need * local > 0.8 * free:
            log.warning("data: the batch rings would need %.2f GB of /dev/shm (%d process(es) on this node) and "
                        "%.2f GB are free; batches take the DataLoader's own, slower, transport instead "
                        "(data.batch_ring)", need * local / 2**30, local, free / 2**30)
            return None
        try:
            return self._log_ring(BatchRing(shapes, workers, prefetch))
        except (MemoryError, RuntimeError) as err:  # e.g. another job filled /dev/shm meanwhile
            log.warning("data: no batch ring (%s); batches take the DataLoader's own transport", err)
            return None

    def _log_ring(self, ring: BatchRing) -> BatchRing:
        if self.dist.is_main:
            log.info("data: batches through %.2f GB of shared memory (%d slots per worker)", ring.nbytes / 2**30,
                     ring.slots_per_worker)
        return ring

    def _setup_model(self) -> None:
        m, d = self.cfg.model, self.cfg.data
        preset = dict(VIT_PRESETS[m.arch])
        for key in ("embed_dim", "depth", "num_heads"):
            if getattr(m, key) is not None:
                preset[key] = getattr(m, key)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        self.pair: StudentTeacher = build_asit(
            preset=preset, img_size=(d.target_frames, d.num_mel_bins), patch_size=m.patch_size,
            drop_path_rate=m.drop_path_rate, out_cls=m.head_out_cls, out_tokens=m.head_out_tokens,
            head_hidden=m.head_hidden, head_bottleneck=m.head_bottleneck, trainable_g=m.trainable_g,
            recon_hidden=m.recon_hidden, recon_out=m.recon_out, attn_backend=m.attn_backend,
        ).to(self.device)
        torch.manual_seed(self.cfg.train.seed + self.dist.rank)
        self.student = self.pair.student
        self.teacher = self.pair.teacher
        step_module = _StudentStep(self.student)
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            step_module = DDP(step_module, device_ids=device_ids)
        self.teacher_forward = self.teacher
        t = self.cfg.train
        use_compile = t.compile if t.compile is not None else (t.mode == "fast" and self.device.type == "cuda")
        if use_compile and t.mode == "reference":
            raise ValueError("train.compile=true contradicts train.mode=reference (the eager baseline)")
        if use_compile:
            step_module = torch.compile(step_module, mode=t.compile_mode)
            self.teacher_forward = torch.compile(self.teacher, mode=t.compile_mode)
        self.compiled = bool(use_compile)
        self.student_step = step_module
        out_tokens = m.head_out_tokens if m.head_out_tokens is not None else m.head_out_cls
        lc = self.cfg.loss
        self.loss_fn = ASiTLoss(
            m.head_out_cls, out_tokens, student_temp=lc.student_temp, center_momentum=lc.center_momentum,
            weight_global=lc.weight_global, weight_local=lc.weight_local, weight_recon=lc.weight_recon,
            local_tokens=lc.local_tokens, global_pairs=lc.global_pairs, all_reduce=self.dist.distributed,
            backend="reference" if self.cfg.train.mode == "reference" else None,
        ).to(self.device)
        self.gmml_gen = torch.Generator(device=self.device)
        self.gmml_gen.manual_seed(self.cfg.train.seed * 1000 + self.dist.rank + 1)
        if self.dist.is_main:
            n = sum(p.numel() for p in self.student.parameters())
            log.info("student: %.1fM parameters (%s); mode %s, precision %s, compile %s", n / 1e6, m.arch,
                     self.cfg.train.mode, self.precision, self.compiled)

    def _setup_optimizer(self) -> None:
        o = self.cfg.optim
        kwargs: dict[str, Any] = {"betas": o.betas}
        if self.device.type == "cuda" or self.sync_free:  # sync-free skips through fused AdamW's found_inf
            kwargs["fused"] = True
        self.optimizer = torch.optim.AdamW(_param_groups(self.student), lr=0.0, **kwargs)
        self.last_layer_params = [p for layer in self.student.head.last_layers for p in layer.parameters()
                                  if p.requires_grad]

    def _setup_schedules(self) -> None:
        o, t, lc = self.cfg.optim, self.cfg.train, self.cfg.loss
        it = self.iters_per_epoch
        global_batch = t.batch_size * self.dist.world_size
        self.lr_sched = cosine_schedule(o.lr * global_batch / 256.0, o.min_lr, t.epochs, it, o.warmup_epochs)
        self.wd_sched = cosine_schedule(o.weight_decay, o.weight_decay_end, t.epochs, it)
        self.momentum_sched = cosine_schedule(o.momentum_teacher, 1.0, t.epochs, it)
        self.temp_sched = teacher_temp_schedule(lc.warmup_teacher_temp, lc.teacher_temp,
                                                lc.warmup_teacher_temp_epochs, t.epochs, it)
        self.total_steps = t.epochs * it

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "step": self.step,
            "epoch": self.step // self.iters_per_epoch,
            "iters_per_epoch": self.iters_per_epoch,
            "world_size": self.dist.world_size,
            "rng": _rng_state(self.gmml_gen),
            "bad_inputs": dict(self.bad_inputs),
            # the current epoch's counts so far (all ranks; reduced by save_checkpoint), for a mid-epoch resume
            "epoch_bad_inputs": dict(self.epoch_bad),
            "epoch_seen": self.epoch_seen,
            **self.guard.state_dict(),  # nonfinite, scaler_overflows, gmml_shortfall
            "config": config_to_dict(self.cfg),
        }

    def save_checkpoint(self) -> Path | None:
        """Write the full training state and prune old checkpoints; every rank must call it.

        Order: (1) with ``train.verify_replicas`` every rank hashes its weights and centres and the hashes
        are compared (:class:`ReplicaMismatchError` if they differ); (2) every rank writes its RNG states
        (they differ per rank) to a side file; (3) barrier; (4) rank 0 writes the checkpoint and its
        checksum, atomically: the commit point, so a checkpoint on disk always has all its RNG files; then
        it prunes; (5) barrier. A crash at any point leaves the previous checkpoint usable.
        """
        self.guard.sync(self.step)
        self._reduce_bad_counts()
        step = self.step
        digests = self._replica_digests() if self.cfg.train.verify_replicas else None
        atomic_save(_rng_state(self.gmml_gen), rng_path(self.run_dir, step, self.dist.rank))
        if self.dist.distributed:
            dist.barrier()
        path = checkpoint_path(self.run_dir, step)
        if self.dist.is_main:
            state = self.state_dict()
            if digests is not None:
                state["replica_digests"] = digests
            atomic_save(state, path)
            prune_checkpoints(self.run_dir, self.cfg.train.keep_last, keep=self._is_permanent)
        if self.dist.distributed:
            dist.barrier()
        return path if self.dist.is_main else None

    def _is_permanent(self, step: int) -> bool:
        """Checkpoints never pruned: every ``keep_every_steps`` steps and every ``keep_every_epochs`` epochs."""
        t = self.cfg.train
        if t.keep_every_steps and step % t.keep_every_steps == 0:
            return True
        it = self.iters_per_epoch
        return bool(t.keep_every_epochs and step % it == 0 and (step // it) % t.keep_every_epochs == 0)

    def _gather(self, obj: Any, group: Any = None) -> list[Any]:
        """``obj`` from every rank, in rank order (a list of one without a process group)."""
        if not self.dist.distributed:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj, group=group)
        return out

    def _replica_digests(self) -> list[str]:
        """SHA-256 of student, teacher and centres on every rank; raises if any rank differs from rank 0."""
        tensors = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        tensors.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        tensors.update({f"loss.{k}": v for k, v in self.loss_fn.state_dict().items()})
        digests = self._gather(tensor_digest(tensors))
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ReplicaMismatchError(
                f"step {self.step}: the weights/centres of rank(s) {differ} differ from rank 0's "
                f"(SHA-256 {[d[:12] for d in digests]}); the DDP replicas drifted apart, so no checkpoint "
                f"was written. The last good one is in {self.run_dir / 'checkpoints'}")
        return digests

    def _restore(self) -> None:
        """Continue from the newest checkpoint that every rank can read.

        Damaged candidates (unreadable, truncated, checksum mismatch, missing keys or RNG file) are reported
        by name, renamed to ``*.corrupt`` and the next older one is tried; the ranks agree on the choice.
        A sound checkpoint that does not fit this run (world size, steps per epoch, model) raises
        :class:`CheckpointError` before any training step.
        """
        names = [p.name for p in list_checkpoints(self.run_dir)]
        if self.dist.distributed:  # rank 0's view decides (all ranks must try the same files)
            holder = [names]
            dist.broadcast_object_list(holder, src=0)
            names = holder[0]
        folder = self.run_dir / "checkpoints"
        damaged: list[str] = []
        for name in reversed(names):
            path = folder / name
            state, rng, problem, misfit = None, None, None, None
            try:
                state = load_checkpoint(path, map_location=self.device)
                misfit = self._layout_misfit(path, state)
                if misfit is None:
                    rng = self._read_rng(path, state)
            except CorruptCheckpointError as err:
                problem = str(err)
            # a sound checkpoint of another world size or epoch length: stop on every rank (its files are
            # fine, so nothing is moved aside; an older checkpoint of the same run would not fit either)
            reports = self._gather((problem, misfit))
            misfits = [m for _, m in reports if m]
            if misfits:
                raise CheckpointError(misfits[0])
            problems = [p for p, _ in reports if p]
            if not problems:
                break
            damaged.append(name)
            if self.dist.is_main:
                for p in dict.fromkeys(problems):
                    log.warning("%s; using an older checkpoint", p)
                log.warning("moved the damaged checkpoint aside: %s", quarantine(path))
            if self.dist.distributed:
                dist.barrier()
        else:
            if damaged:
                raise CorruptCheckpointError(
                    f"no usable checkpoint in {folder}: all of {damaged} are damaged (renamed to *.corrupt; "
                    "see the warnings above). Remove --resume or the folder to start from scratch")
            if self.dist.is_main:
                log.info("no checkpoint in %s: starting from scratch", self.run_dir)
            return
        self._apply_state(path, state, rng)

    def _layout_misfit(self, path: Path, state: dict[str, Any]) -> str | None:
        """Why checkpoint ``path`` cannot continue in this run's layout (another world size or number of steps
        per epoch), or None. Checked before the RNG side files: a larger world has ranks without one.

        Raises:
            CorruptCheckpointError: the checkpoint lacks the two values.
        """
        try:
            world, iters = int(state["world_size"]), int(state["iters_per_epoch"])
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptCheckpointError(f"checkpoint {path} lacks a valid world_size/iters_per_epoch") from err
        if world != self.dist.world_size:
            return (f"{path} was written by {world} process(es), this run has {self.dist.world_size}: exact "
                    f"resume needs the same world size. Relaunch with {world} process(es) in total (torchrun "
                    "--nnodes × --nproc_per_node), or use a new train.output_dir to start a separate run")
        if iters != self.iters_per_epoch:
            return (f"{path}: {iters} steps/epoch there, {self.iters_per_epoch} now (dataset, "
                    "train.batch_size or train.max_steps_per_epoch changed): resume with the settings it was "
                    "written with, or use a new train.output_dir")
        return None

    def _read_rng(self, path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This rank's RNG states for checkpoint ``path``: rank 0's are inside it, the others' in side files
        (only called once the world sizes are known to match)."""
        if self.dist.rank == 0:
            return state["rng"]
        side = rng_path(self.run_dir, checkpoint_step(path), self.dist.rank)
        if not side.is_file():
            raise CorruptCheckpointError(f"checkpoint {path}: the RNG file of rank {self.dist.rank}, {side.name}, "
                                         "is missing")
        return load_checkpoint(side, required=("torch", "gmml"))

    def _check_model_matches(self, path: Path, state: dict[str, Any]) -> None:
        """Raise a :class:`CheckpointError` naming ``path`` and the differing settings when the checkpoint was
        written for another model (before any tensor is copied)."""
        ours, theirs = self.student.state_dict(), state["student"]
        missing = sorted(ours.keys() - theirs.keys())
        unexpected = sorted(theirs.keys() - ours.keys())
        reshaped = sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
        if not (missing or unexpected or reshaped):
            return
        saved = state["config"].get("model", {}) if isinstance(state["config"], dict) else {}
        now = config_to_dict(self.cfg)["model"]
        settings = [f"model.{k}: {saved[k]!r} there, {v!r} here" for k, v in now.items()
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

    def _warn_changed_config(self, path: Path, state: dict[str, Any]) -> None:
        """Rank 0: warn, listing them, when keys outside :data:`RESUME_FREE_KEYS` differ from the config saved in
        checkpoint ``path``: the run continues, but not as the saved one would have."""
        if not (self.dist.is_main and isinstance(state["config"], dict)):
            return
        saved, now = _flatten(state["config"]), _flatten(config_to_dict(self.cfg))
        from asit.data.shards import ShardPretrainDataset

        free = RESUME_FREE_KEYS
        if isinstance(self.dataset, ShardPretrainDataset):
            # shards: each loader worker reads its own run of batches through its own shuffle buffer, so the
            # worker count sets the order of the clips (and which ones a mid-epoch skip covers)
            free = free - {"data.num_workers"}
        changed = [f"{k}: {saved[k]!r} there, {v!r} here" for k, v in now.items()
                   if k in saved and saved[k] != v and k not in free]
        if changed:
            log.warning("resuming from %s with %d setting(s) changed: %s. The run continues with the new values "
                        "(data order, schedules or the objective may differ from the run that wrote the checkpoint); "
                        "resume with the values found 'there' for an exact continuation", path,
                        len(changed), "; ".join(changed))

    def _apply_state(self, path: Path, state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
        self._check_model_matches(path, state)
        self._warn_changed_config(path, state)
        try:
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
        except RuntimeError as err:
            raise CheckpointError(f"{path} does not match the configured model: {err}") from err
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:  # e.g. parameter groups of another split (asit before the DINO decay rule)
            raise CheckpointError(f"{path}: its optimiser state does not fit this run's parameter groups ({err}); "
                                  "resume with the asit version that wrote it, or use a new train.output_dir") from err
        self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        self.bad_inputs.update(state.get("bad_inputs", {}))
        self.epoch_bad = Counter(state.get("epoch_bad_inputs", {}))
        self.epoch_seen = int(state.get("epoch_seen", 0))
        self.guard.load_state_dict(state)
        self.step = int(state["step"])
        self.start_epoch = self.step // self.iters_per_epoch
        self.skip_batches = self.step % self.iters_per_epoch
        torch.set_rng_state(rng["torch"].cpu())
        self.gmml_gen.set_state(rng["gmml"].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"].cpu())
        if self.dist.is_main:
            trim_log(self.run_dir / "log.jsonl", self.step)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.start_epoch,
                     self.skip_batches)

    # ------------------------------------------------------------------ training
    def _corrupt(self, views: torch.Tensor):
        """GMML on each global view separately (alien sources from the same view of other clips).

        views: ``[B, V, 1, T, F]`` → view-major ``[V·B, 1, T, F]`` clean, corrupted, mask, token fraction.
        """
        g = self.cfg.gmml
        b, v, _, t, f = views.shape
        clean, corrupted, masks, fracs = [], [], [], []
        for i in range(v):
            x = views[:, i]
            blocks = sample_gmml_blocks(b, t, f, generator=self.gmml_gen, device=self.device,
                                        zero_ratio=g.zero_ratio, alien_ratio=g.alien_ratio,
                                        alien_prob=g.alien_prob, max_block_frac=g.max_block_frac,
                                        align=g.align, allow_self_alien=g.allow_self_alien,
                                        budget=g.candidate_budget if self.sync_free else None)
            out = gmml_corrupt(x, blocks, self.cfg.model.patch_size)
            if self.sync_free:
                self.guard.shortfall += gmml_shortfall(out.mask, blocks.target).sum()
            clean.append(x)
            corrupted.append(out.corrupted)
            masks.append(out.mask)
            fracs.append(out.token_fraction)
        return torch.cat(clean), torch.cat(corrupted), torch.cat(masks), torch.cat(fracs)

    def _set_hyperparams(self) -> dict[str, float]:
        i = min(self.step, self.total_steps - 1)
        lr, wd = float(self.lr_sched[i]), float(self.wd_sched[i])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = wd
        return {"lr": lr, "wd": wd, "momentum": float(self.momentum_sched[i]),
                "teacher_temp": float(self.temp_sched[i])}

    def _clip_gradients(self) -> torch.Tensor | None:
        o = self.cfg.optim
        params = [p for p in self.student.parameters() if p.grad is not None]
        if o.clip_grad <= 0 or not params:
            return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        if o.clip_mode == "global":
            return torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        # Authors' (DINO) clipping: each parameter's gradient separately, without host syncs.
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms = torch._foreach_norm([p.grad for p in params])
        scales = [torch.clamp(o.clip_grad / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_([p.grad for p in params], scales)
        return total

    def batch_views(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A loader batch with its fbank views: with ``data.fbank_on=device`` the loader sends waveform
        crops (``"waves"``, ``"local_waves"``), which are moved to the device and turned into normalised
        views there, all clips in one call (:func:`~asit.data.fbank.fbank_views`). Batch-ring references
        (``data.batch_ring`` without pinning, i.e. on the CPU) are copied out first; other batches pass
        as they are."""
        batch = resolve_ring_refs(batch)
        if "waves" not in batch:
            return batch
        d = self.cfg.data
        batch = dict(batch)
        for key, out, frames in (("waves", "views", d.target_frames),
                                 ("local_waves", "local_views", d.local_target_frames)):
            if key in batch:
                waves = batch.pop(key).to(self.device, non_blocking=True)
                batch[out] = fbank_views(waves, d.sample_rate, d.num_mel_bins, frames, d.mean, d.std)
        return batch

    def _batch_usable(self, batch: dict[str, Any]) -> bool:
        """True when every rank has at least 2 decodable clips (GMML's alien mode and the batch
        statistics need 2). Ranks must agree, or DDP's gradient all-reduce would pair up different
        steps and hang."""
        too_small = batch["views"].shape[0] < 2
        if not self.dist.distributed:
            return not too_small
        # sync-free under NCCL: over the gloo group, on the host; otherwise over the default group (with
        # NCCL the read-back then waits for the device)
        device = "cpu" if self._host_group is not None else self.device
        flag = torch.tensor([float(too_small)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group)
        return not bool(flag[0])

    def train_step(self, batch: dict[str, Any], epoch: int, *, monitors: bool = False,
                   preview: bool = False) -> StepResult:
        """One optimisation step on a collated batch.

        A non-finite loss term or gradient norm (on any rank) skips the step: the gradients are
        dropped and neither the optimiser, the teacher nor the centres change; the step counter still
        advances (the batch is consumed and the schedules move on, so resume stays exact). With fp16 loss
        scaling, finite loss terms and a non-finite gradient norm are the scaler's overflow: the scaler skips
        the optimiser step and lowers its scale, the teacher and centres update (the authors' loop), and the
        step counts towards ``train.max_consecutive_nonfinite`` only while overflows follow each other. Checking
        costs one host sync per step (plus a tiny all-reduce under DDP), unless the trainer runs
        sync-free (``train.sync_free``): then the skip is applied on the device and reported at the next
        log interval, checkpoint or epoch end (:meth:`NonFiniteGuard.sync`), and the result's ``nonfinite``
        is read only when asked for.

        Args:
            monitors: also compute the collapse monitors (teacher entropies; a host sync).
            preview: keep the first few samples for the epoch's reconstruction picture.
        """
        hp = self._set_hyperparams()
        batch = self.batch_views(batch)  # waveform crops (data.fbank_on=device) → views; else unchanged
        views = batch["views"].to(self.device, non_blocking=True)
        local_views = None
        if "local_views" in batch and batch["local_views"].numel() > 0:
            lv = batch["local_views"].to(self.device, non_blocking=True)  # [B, L, 1, T', F]
            local_views = lv.transpose(0, 1).flatten(0, 1)
        if "corrupted" in batch:  # reference mode: corrupted on the CPU by the loader
            clean = views.transpose(0, 1).flatten(0, 1)
            corrupted, mask, frac = (batch[k].to(self.device, non_blocking=True)
                                     for k in ("corrupted", "mask", "token_fraction"))
        else:
            clean, corrupted, mask, frac = self._corrupt(views)
        with self._autocast():
            student_out, local_cls = self.student_step(corrupted, local_views)
            with torch.no_grad():
                teacher_out = self.teacher_forward(clean, with_recon=False)
            losses, center_stats = self.loss_fn(student_out, teacher_out, clean, mask, frac,
                                                hp["teacher_temp"], local_cls)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        if epoch < self.cfg.optim.freeze_last_layer_epochs:
            for p in self.last_layer_params:
                p.grad = None  # AdamW skips parameters without a gradient: frozen, no decay either
        terms = {k: v.detach() for k, v in losses.items()}
        if grad_norm is not None:
            terms["grad_norm"] = grad_norm.detach()
        result = StepResult(terms, flags=self.guard.flags(terms), scaling=self.scaler.is_enabled())
        if monitors:
            result.monitors = self._monitors(hp, teacher_out)  # with the centres this step used
        if preview:  # a skipped step's picture is dropped at the epoch end (_end_epoch reads the flags)
            n = min(4, clean.shape[0])
            recon = student_out["recon"]
            self._preview = (result, *(t[:n].detach().float().clone() for t in (clean, corrupted, recon, mask)))
        self.guard.step_or_skip(result, step=self.step + 1, optimizer=self.optimizer, scaler=self.scaler,
                                loss_fn=self.loss_fn, pair=self.pair, momentum=hp["momentum"],
                                center_stats=center_stats)
        self.step += 1
        self._hp = hp
        return result

    def _monitors(self, hp: dict[str, float], teacher_out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Collapse monitors: teacher entropy per head (max log K), with the step's centres; 0-d device
        tensors, read when the step is logged."""
        lf = self.loss_fn
        return {
            "teacher_entropy_cls": softmax_entropy(teacher_out["cls_logits"], lf.center_global,
                                                   hp["teacher_temp"]),
            "teacher_entropy_tokens": softmax_entropy(teacher_out["token_logits"], lf.center_local,
                                                      hp["teacher_temp"]),
        }

    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns a summary (first/last logged loss, wall time, steps).

        Raises :class:`NonFiniteLossError` after ``train.max_consecutive_nonfinite`` skipped steps in a row.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.student_step.train()
        summary: dict[str, Any] = {"first_loss": None, "last_loss": None}
        started = time.time()
        for epoch in range(self.start_epoch, cfg.train.epochs):
            skip = self.skip_batches if epoch == self.start_epoch else 0
            self.sampler.set_epoch(epoch, skip * cfg.train.batch_size)
            set_epoch = getattr(self.dataset, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
            bar = tqdm(total=self.iters_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not (self.dist.is_main and cfg.train.progress), dynamic_ncols=True, leave=True)
            window_start, window_samples = time.time(), 0
            self._preview = None
            for batch in self.loader:
                batch = self.batch_views(batch)
                self._pending_bad.update(batch.get("skip_reasons", []))
                self._pending_seen += batch["views"].shape[0] + int(batch.get("num_skipped", 0))
                next_step = self.step + 1
                log_now = next_step % cfg.train.log_every == 0 or next_step == self.total_steps
                result = None
                if self._batch_usable(batch):
                    result = self.train_step(batch, epoch, monitors=log_now,
                                             preview=next_step % self.iters_per_epoch == 0)
                    window_samples += batch["views"].shape[0] * self.dist.world_size
                else:
                    log.warning("step %d: fewer than 2 usable clips in the batch (on some rank), "
                                "step skipped", self.step + 1)
                    self.step += 1
                bar.update(1)
                if log_now:
                    self.guard.sync(self.step)
                    self._reduce_bad_counts()  # every rank: the same step, the same totals, the same verdict
                    self._check_bad_fraction(epoch, epoch_done=False)
                if log_now and result is not None and not result.skipped:
                    rate = window_samples / max(time.time() - window_start, 1e-9)
                    values = self._log_values(result, epoch, rate)
                    self.writer.write(self.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", glob=f"{values['global']:.3f}",
                                    local=f"{values['local']:.3f}", rec=f"{values['recon']:.3f}",
                                    sps=f"{values['samples_per_s']:.1f}")
                    if summary["first_loss"] is None:
                        summary["first_loss"] = values["loss"]
                    summary["last_loss"] = values["loss"]
                    window_start, window_samples = time.time(), 0
                if self.step == self._fault_at:
                    _inject_fault(self.run_dir, self.step)
                every = cfg.train.checkpoint_every_steps
                if every and self.step % every == 0 and self.step % self.iters_per_epoch != 0:
                    self.save_checkpoint()
            bar.close()
            self.guard.sync(self.step)
            self._end_epoch(epoch)
        summary.update(steps=self.step, wall_time_s=time.time() - started,
                       nonfinite_skipped=self.guard.nonfinite_total)
        if self.dist.is_main:
            summary["encoder"] = str(self.export_teacher_encoder())
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _log_values(self, result: StepResult, epoch: int, samples_per_s: float) -> dict[str, Any]:
        values: dict[str, Any] = {k: float(v) for k, v in result.terms.items()}
        values.update(self._hp)
        values["samples_per_s"] = samples_per_s
        values["epoch"] = epoch
        values.update({k: float(v) for k, v in result.monitors.items()})
        values["center_norm_cls"] = float(self.loss_fn.center_global.norm())
        values["center_norm_tokens"] = float(self.loss_fn.center_local.norm())
        values["nonfinite_total"] = self.guard.nonfinite_total
        if self.scaler.is_enabled():  # fp16
            values["loss_scale"] = self.scaler.get_scale()
            values["scaler_overflows"] = self.guard.scaler_overflows
        if self.sync_free:
            values["gmml_shortfall"] = self.guard.gmml_shortfall_total  # read by guard.sync just before
        return values

    def _reduce_bad_counts(self) -> None:
        """Add every rank's unusable and loaded clips since the last call to the epoch's totals, which are then
        the same on every rank. A collective (over the gloo group when the step runs sync-free under NCCL):
        all ranks call it at the same points (log steps, checkpoints, epoch ends)."""
        mine = (dict(self._pending_bad), self._pending_seen)
        for bad, seen in self._gather(mine, group=self._host_group):
            self.epoch_bad.update(bad)
            self.epoch_seen += seen
        self._pending_bad, self._pending_seen = Counter(), 0

    def _check_bad_fraction(self, epoch: int, *, epoch_done: bool) -> None:
        """Raise :class:`BadDataError` when the epoch's unusable clips (all ranks, as of the last
        :meth:`_reduce_bad_counts`) exceed ``data.max_bad_fraction``; the same verdict on every rank."""
        planned = self.iters_per_epoch * self.cfg.train.batch_size * self.dist.world_size
        message = bad_fraction_error(self.epoch_bad, self.epoch_seen, planned, self.cfg.data.max_bad_fraction,
                                     epoch_done=epoch_done)
        if message:
            raise BadDataError(f"epoch {epoch + 1}: {message}. Check the manifest {self.cfg.data.train_manifest} "
                               "(the log names each file) or raise the limit.")

    def _end_epoch(self, epoch: int) -> None:
        self._reduce_bad_counts()
        bad = sum(self.epoch_bad.values())
        if bad and self.dist.is_main:
            log.warning("epoch %d: skipped %d of %d clip(s) (%.2f%%, all processes): %s", epoch + 1, bad,
                        self.epoch_seen, 100 * bad / max(self.epoch_seen, 1), dict(self.epoch_bad.most_common(5)))
        self._check_bad_fraction(epoch, epoch_done=True)
        self.bad_inputs.update(self.epoch_bad)
        self.epoch_bad, self.epoch_seen = Counter(), 0
        self.writer.flush()
        every = self.cfg.train.image_every_epochs
        if (self.dist.is_main and every and (epoch + 1) % every == 0 and self._preview is not None
                and not self._preview[0].skipped):
            _, clean, corrupted, recon, mask = self._preview
            save_reconstruction_grid(self.run_dir / "images" / f"epoch_{epoch + 1:04d}.png", clean, corrupted,
                                     recon, mask, title=f"epoch {epoch + 1}, step {self.step}")
        self.save_checkpoint()

    # ------------------------------------------------------------------ export / cleanup
    def export_teacher_encoder(self) -> Path:
        """Write the teacher backbone alone (timm parameter names) as safetensors, atomically
        (:func:`asit.eval.encoder.export_encoder`: the format ``load_encoder`` reads)."""
        from asit.eval.encoder import export_encoder

        d = self.cfg.data
        return export_encoder(self.teacher.backbone, self.run_dir / "teacher_encoder.safetensors",
                              sample_rate=d.sample_rate, mean=d.mean, std=d.std, arch=self.cfg.model.arch,
                              config=config_to_dict(self.cfg), step=self.step)

    def cleanup(self) -> None:
        loader = getattr(self, "loader", None)
        if loader is not None and hasattr(loader, "close"):  # DALI: its pipeline and shard index files
            loader.close()
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.release()
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
        cleanup_distributed()


