"""The pretraining recipe: :class:`Pretrainer` sets up data, model, optimiser and schedules, runs the
training loop, writes checkpoints and exports the teacher encoder. The mechanisms it calls live beside it
and take their settings as arguments: the loaders (:mod:`.loaders`), the non-finite guard (:mod:`.guard`),
unusable-clip accounting (:mod:`.bad_data`), restore and RNG files (:mod:`.resume`), checkpoint files
(:mod:`.checkpoint`), one run per output folder (:mod:`.run_dir`), signals and timed checkpoints agreed at
step boundaries (:mod:`.interrupts`) and the fault-injection test hook (:mod:`.faults`).
``scripts/pretrain.py`` is a thin wrapper around :class:`Pretrainer`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

from asit.atomic_io import atomic_write_text
from asit.config import Config, config_to_dict, rename_old_keys
from asit.models import VIT_PRESETS, StudentTeacher, build_asit
from asit.ops import expected_gmml_blocks, gmml_corrupt, gmml_shortfall, sample_gmml_blocks

from .bad_data import BadDataTally, batch_usable
from .checkpoint import atomic_save, checkpoint_path, permanent_rule, prune_checkpoints, replica_digests
from .cpu_threads import set_cpu_threads
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .faults import FaultHook
from .guard import NonFiniteGuard, StepResult
from .interrupts import StepBoundary
from .loaders import batch_views, build_pretrain_data
from .losses import ASiTLoss
from .metrics import MetricWriter, RateWatch, Throughput, collapse_monitors, trim_log
from .optim import clip_gradients, param_groups
from .precision import autocast, resolve_precision
from .probe_monitor import ProbeMonitor
from .report import next_steps
from .resume import (
    RESUME_FREE_KEYS,
    check_model_matches,
    find_restorable,
    layout_misfit,
    load_module_states,
    rng_state,
    save_rng,
    set_rng_state,
    warn_changed_config,
)
from .run_dir import check_run_dir, claim_run_dir
from .schedules import cosine_schedule, teacher_temp_schedule
from .step_graph import StepGraph
from .student_step import StudentStep
from .visualize import save_reconstruction_grid

__all__ = ["Pretrainer"]

log = logging.getLogger(__name__)


class Pretrainer:
    """ASiT pretraining, single process or under torchrun (DDP).

    Usage::

        trainer = Pretrainer(load_config("demo_cpu"), resume=True)
        trainer.setup()
        trainer.train()
        trainer.cleanup()
    """

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False) -> None:
        if resume and overwrite:
            raise ValueError("resume and overwrite contradict each other: resume continues the run in "
                             "train.output_dir, overwrite moves it aside and starts a new one")
        self.cfg = cfg
        self.resume, self.overwrite = resume, overwrite
        self.run_dir = Path(cfg.train.output_dir)
        self.step = 0
        self.start_epoch = 0
        self.skip_batches = 0
        self.bad_data = BadDataTally(cfg.data.max_bad_fraction, cfg.data.train_manifest)
        self.bad_inputs = self.bad_data.total  # unusable clips per reason, all ranks, finished epochs
        # the epoch's last step: its StepResult and a few (clean, corrupted, recon, mask) samples
        self._preview: tuple | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build everything; restore from the latest checkpoint when resuming. A fresh start refuses a
        ``train.output_dir`` that holds another run unless ``overwrite`` (:mod:`.run_dir`); the folder and
        its ``config.yaml`` are written only once the rest of the setup succeeded."""
        cfg = self.cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.threads = set_cpu_threads(self.device, cfg.data.num_workers, announce=self.dist.is_main)
        self.rate_watch = RateWatch(cpu=self.device.type == "cpu")
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        resuming = self.resume or (cfg.train.auto_resume and restarts > 0)
        check_run_dir(self.run_dir, resume=resuming, overwrite=self.overwrite or restarts > 0,
                      is_main=self.dist.is_main, gather=self._gather if self.dist.distributed else None)
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        self._setup_precision()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_schedules()
        if resuming:
            if restarts and self.dist.is_main:
                log.warning("torchrun restarted the workers (restart %d): resuming from the latest good "
                            "checkpoint", restarts)
            self._restore()
        self.pair.refresh_teacher_copy()
        self.step_graph = StepGraph(self) if cfg.train.cuda_graph else None  # the captured step
        if self.dist.is_main:
            claim_run_dir(cfg, resume=resuming, overwrite=self.overwrite, restarted=restarts > 0)
        self._gather(None)  # the other ranks write into the folder only after rank 0 claimed it
        self.boundary = StepBoundary(self.dist, every_minutes=cfg.train.checkpoint_every_minutes,
                                     group=self._host_group)
        self.fault = FaultHook(self.run_dir, self.dist.rank, self.dist.world_size)
        self.writer = MetricWriter(self.run_dir, enabled=self.dist.is_main)
        self.probe = (ProbeMonitor.from_config(cfg, self.teacher.backbone, amp_dtype=self.amp_dtype)
                      if self.dist.is_main and cfg.eval.probe_manifest else None)

    def _setup_precision(self) -> None:
        """Precision and loss scaling, whether the step runs sync-free (``train.sync_free``), the non-finite
        guard, the GMML budget check and, sync-free under NCCL, the gloo group for host-side agreement."""
        t = self.cfg.train
        self.precision, self.amp_dtype = resolve_precision(t.precision, t.mode, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if t.sync_free and self.precision == "fp16":
            raise ValueError("train.sync_free=true needs bf16 or fp32: fp16's loss scaler reads its overflow "
                             "flag on the host")
        self.sync_free = (t.mode == "fast" and self.device.type == "cuda" and self.precision != "fp16"
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

    def _setup_data(self) -> None:
        data = build_pretrain_data(self.cfg, self.dist, gather=self._gather)
        self.loader, self.sampler, self.dataset, self.ring = data.loader, data.sampler, data.dataset, data.ring
        self.iters_per_epoch, self.fbank_on = data.iters_per_epoch, data.fbank_on

    def _setup_model(self) -> None:
        m, d, t = self.cfg.model, self.cfg.data, self.cfg.train
        authors = t.mode == "authors"
        preset = dict(VIT_PRESETS[m.arch])
        for key in ("embed_dim", "depth", "num_heads"):
            if getattr(m, key) is not None:
                preset[key] = getattr(m, key)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        self.pair: StudentTeacher = build_asit(
            preset=preset, img_size=(d.target_frames, d.num_mel_bins), patch_size=m.patch_size,
            drop_path_rate=m.drop_path_rate, out_cls=m.head_out_cls, out_tokens=m.head_out_tokens,
            head_hidden=m.head_hidden, head_bottleneck=m.head_bottleneck, trainable_g=m.trainable_g,
            recon_hidden=m.recon_hidden, recon_out=m.recon_out, token_logits=not self.cfg.loss.fused_head,
            attn_backend="naive" if authors and m.attn_backend == "auto" else m.attn_backend,
            cls_token_std=m.cls_token_std, pos_embed_fit=m.local_pos_embed, init=m.init,
            residual_dtype=m.residual_dtype, mlp_gelu=m.mlp_gelu,
        ).to(self.device)
        for key, on in (("train.teacher_bf16=true", t.teacher_bf16), ("model.residual_dtype=bf16",
                                                                    m.residual_dtype == "bf16")):
            if on and self.precision != "bf16":
                raise ValueError(f"{key} needs bf16 precision, not {self.precision}")
        self.pair.configure_ema(t.ema if t.ema != "auto" else "per_tensor" if authors else "foreach",
                                teacher_dtype=torch.bfloat16 if t.teacher_bf16 else None)
        torch.manual_seed(self.cfg.train.seed + self.dist.rank)
        self.student = self.pair.student
        self.teacher = self.pair.teacher
        step_module = StudentStep(self.student)
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            step_module = DDP(step_module, device_ids=device_ids)
        self.teacher_forward = self.teacher if self.pair.teacher_copy is None else self.pair.teacher_copy
        use_compile = t.compile if t.compile is not None else (t.mode == "fast" and self.device.type == "cuda")
        if use_compile and authors:
            raise ValueError("train.compile=true contradicts train.mode=authors (the eager baseline)")
        if use_compile:
            step_module = torch.compile(step_module, mode=t.compile_mode)
            self.teacher_forward = torch.compile(self.teacher_forward, mode=t.compile_mode)
        self.compiled = bool(use_compile)
        self.student_step = step_module
        out_tokens = m.head_out_tokens if m.head_out_tokens is not None else m.head_out_cls
        lc = self.cfg.loss
        self.ops_backend = "reference" if authors or t.ops_backend == "reference" else None  # None: auto
        self.loss_fn = ASiTLoss(
            m.head_out_cls, out_tokens, student_temp=lc.student_temp, center_momentum=lc.center_momentum,
            weight_global=lc.weight_global, weight_local=lc.weight_local, weight_recon=lc.weight_recon,
            local_tokens=lc.local_tokens, global_pairs=lc.global_pairs, all_reduce=self.dist.distributed,
            backend=self.ops_backend, fused_head=lc.fused_head,
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
        if self.cfg.train.mode == "authors":  # the authors' for-loop AdamW
            kwargs.update(foreach=False, fused=False)
        elif self.device.type == "cuda" or self.sync_free:  # sync-free skips through fused AdamW's found_inf
            kwargs["fused"] = True
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0, **kwargs)
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
            "rng": rng_state(cuda=torch.cuda.is_available(), gmml=self.gmml_gen.get_state()),
            # bad_inputs, and the current epoch's counts so far (all ranks; reduced by save_checkpoint) for a
            # mid-epoch resume: epoch_bad_inputs, epoch_seen
            **self.bad_data.state_dict(),
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
        self.bad_data.reduce(self._gather, self._host_group)
        step, folder, t = self.step, self.run_dir / "checkpoints", self.cfg.train
        digests = replica_digests({"student": self.student, "teacher": self.teacher, "loss": self.loss_fn},
                                  self._gather, step=step, folder=folder) if t.verify_replicas else None
        save_rng(folder, step, self.dist.rank, rng_state(cuda=torch.cuda.is_available(),
                                                         gmml=self.gmml_gen.get_state()))
        if self.dist.distributed:
            dist.barrier()
        path = checkpoint_path(self.run_dir, step)
        if self.dist.is_main:
            state = self.state_dict()
            if digests is not None:
                state["replica_digests"] = digests
            atomic_save(state, path)
            prune_checkpoints(self.run_dir, t.keep_last,
                              keep=permanent_rule(t.keep_every_steps, t.keep_every_epochs, self.iters_per_epoch))
        if self.dist.distributed:
            dist.barrier()
        return path if self.dist.is_main else None

    def _gather(self, obj: Any, group: Any = None) -> list[Any]:
        """``obj`` from every rank, in rank order (a list of one without a process group)."""
        if not self.dist.distributed:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj, group=group)
        return out

    def _restore(self) -> None:
        """Continue from the newest checkpoint that every rank can read (:func:`~.resume.find_restorable`:
        damaged ones are moved aside, one of another world size or epoch length is refused).

        A sound checkpoint written for another model raises :class:`CheckpointError` before any tensor is
        copied; changed settings outside :data:`~.resume.RESUME_FREE_KEYS` are listed in a warning.
        """
        misfit = functools.partial(layout_misfit, world_size=self.dist.world_size,
                                   iters_per_epoch=self.iters_per_epoch)
        found = find_restorable(self.run_dir, self.dist, gather=self._gather, misfit=misfit,
                                rng_keys=("torch", "gmml"))
        if found is None:  # nothing to resume: start from step 0, the log too
            if self.dist.is_main:
                trim_log(self.run_dir / "log.jsonl", 0)
            return
        path, state, rng = found
        now = config_to_dict(self.cfg)
        rename_old_keys(state["config"])  # train.mode=reference → authors
        check_model_matches(path, self.student.state_dict(), state["student"], state["config"], now["model"])
        if self.dist.is_main:
            from asit.data.shards import ShardPretrainDataset

            # shards: each loader worker reads its own run of batches through its own shuffle buffer, so the
            # worker count sets the order of the clips (and which ones a mid-epoch skip covers)
            shards = isinstance(self.dataset, ShardPretrainDataset)
            warn_changed_config(path, state["config"], now, RESUME_FREE_KEYS - ({"data.num_workers"} if shards
                                                                                  else set()))
        load_module_states(path, state, {"student": self.student, "teacher": self.teacher}, self.optimizer)
        self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        self.bad_data.load_state_dict(state)
        self.guard.load_state_dict(state)
        self.step = int(state["step"])
        self.start_epoch = self.step // self.iters_per_epoch
        self.skip_batches = self.step % self.iters_per_epoch
        set_rng_state(rng, cuda=torch.cuda.is_available())
        self.gmml_gen.set_state(rng["gmml"].cpu())
        if self.dist.is_main:
            trim_log(self.run_dir / "log.jsonl", self.step)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.start_epoch + 1,
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
                                        budget=g.candidate_budget if self.sync_free else None,
                                        backend=self.ops_backend)
            out = gmml_corrupt(x, blocks, self.cfg.model.patch_size, backend=self.ops_backend)
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
        if self.step_graph is not None:  # train.cuda_graph: the same step, captured (step_graph.py)
            return self.step_graph.step(batch, epoch, monitors=monitors, preview=preview)
        hp = self._set_hyperparams()
        batch = batch_views(batch, self.cfg.data, self.device)  # waveform crops (fbank_on=device) → views
        views = batch["views"].to(self.device, non_blocking=True)
        local_views = None
        if "local_views" in batch and batch["local_views"].numel() > 0:
            lv = batch["local_views"].to(self.device, non_blocking=True)  # [B, L, 1, T', F]
            local_views = lv.transpose(0, 1).flatten(0, 1)
        if "corrupted" in batch:  # authors mode: corrupted on the CPU by the loader
            clean = views.transpose(0, 1).flatten(0, 1)
            corrupted, mask, frac = (batch[k].to(self.device, non_blocking=True)
                                     for k in ("corrupted", "mask", "token_fraction"))
        else:
            with record_function("asit.gmml"):  # the step's parts, named for bench/profile_step.py
                clean, corrupted, mask, frac = self._corrupt(views)
        student_out, teacher_out, losses, center_stats = self._forward_losses(clean, corrupted, mask, frac,
                                                                              local_views, hp["teacher_temp"])
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("asit.backward"):
            self.scaler.scale(losses["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        with record_function("asit.clip"):
            grad_norm = clip_gradients(self.student, self.cfg.optim.clip_grad, self.cfg.optim.clip_mode,
                                       host_reads=self.cfg.train.mode == "authors")
        terms = self._step_terms(losses, grad_norm, frozen=epoch < self.cfg.optim.freeze_last_layer_epochs)
        result = StepResult(terms, flags=self.guard.flags(terms), scaling=self.scaler.is_enabled())
        if monitors:  # with the centres this step used
            result.monitors = collapse_monitors(teacher_out, self.loss_fn.center_global, self.loss_fn.center_local,
                                                hp["teacher_temp"])
        if preview:  # a skipped step's picture is dropped at the epoch end (_end_epoch reads the flags)
            n = min(4, clean.shape[0])
            recon = student_out["recon"]
            self._preview = (result, *(t[:n].detach().float().clone() for t in (clean, corrupted, recon, mask)))
        with record_function("asit.update"):  # AdamW (its own range), EMA ("asit.ema"), centres
            self.guard.step_or_skip(result, step=self.step + 1, optimizer=self.optimizer, scaler=self.scaler,
                                    loss_fn=self.loss_fn, pair=self.pair, momentum=hp["momentum"],
                                    center_stats=center_stats)
        self.step += 1
        self._hp = hp
        return result

    def _forward_losses(self, clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor, frac: torch.Tensor,
                        local_views: torch.Tensor | None, teacher_temp: float | torch.Tensor):
        """Both forwards and the losses under autocast: ``(student_out, teacher_out, losses, center_stats)``."""
        with autocast(self.device, self.amp_dtype):
            with record_function("asit.student_forward"):
                student_out, local_cls = self.student_step(corrupted, local_views)
            with torch.no_grad(), record_function("asit.teacher_forward"):
                teacher_out = self.teacher_forward(clean, with_recon=False)
            with record_function("asit.losses"):
                losses, center_stats = self.loss_fn(student_out, teacher_out, clean, mask, frac, teacher_temp,
                                                    local_cls)
        return student_out, teacher_out, losses, center_stats

    def _step_terms(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, *,
                    frozen: bool) -> dict[str, torch.Tensor]:
        """After the backward: drop the frozen last layer's gradients, then the detached loss terms and norm."""
        if frozen:
            for p in self.last_layer_params:
                p.grad = None  # AdamW skips parameters without a gradient: frozen, no decay either
        terms = {k: v.detach() for k, v in losses.items()}
        if grad_norm is not None:
            terms["grad_norm"] = grad_norm.detach()
        return terms

    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns a summary (first/last logged loss, wall time, steps).

        Raises :class:`NonFiniteLossError` after ``train.max_consecutive_nonfinite`` skipped steps in a row, and
        :class:`~.interrupts.Interrupted` after SIGINT/SIGTERM, once every rank wrote the checkpoint of the step
        boundary where they agreed to stop (:class:`~.interrupts.StepBoundary`).
        """
        from tqdm.auto import tqdm

        t = self.cfg.train
        self.student_step.train()
        summary: dict[str, Any] = {"first_loss": None, "last_loss": None}
        started = time.time()
        self.boundary.install()
        for epoch in range(self.start_epoch, t.epochs):
            skip = self.skip_batches if epoch == self.start_epoch else 0
            self.sampler.set_epoch(epoch, skip * t.batch_size)
            set_epoch = getattr(self.dataset, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
            bar = tqdm(total=self.iters_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{t.epochs}",
                       disable=not (self.dist.is_main and t.progress), dynamic_ncols=True, leave=True)
            meter = Throughput()
            self._preview = None
            for batch in self.loader:
                batch = batch_views(batch, self.cfg.data, self.device)
                self.bad_data.count(batch)
                next_step = self.step + 1
                log_now = next_step % t.log_every == 0 or next_step == self.total_steps
                result = None
                if batch_usable(batch, self.dist, self._host_group):
                    result = self.train_step(batch, epoch, monitors=log_now,
                                             preview=next_step % self.iters_per_epoch == 0)
                    meter.add(batch["views"].shape[0] * self.dist.world_size)
                else:
                    log.warning("step %d: fewer than 2 usable clips in the batch (on some rank), "
                                "step skipped", self.step + 1)
                    self.step += 1
                bar.update(1)
                if log_now:
                    self._log_step(result, epoch, meter, bar, summary)
                self.fault(self.step)
                every, epoch_end = t.checkpoint_every_steps, self.step % self.iters_per_epoch == 0
                due = self.boundary.poll(self.step, scheduled=epoch_end or bool(every and self.step % every == 0))
                if due.save and not epoch_end:  # an epoch's last step: _end_epoch writes it
                    self.save_checkpoint()
                if due.stop:
                    break
            bar.close()
            self.guard.sync(self.step)
            if not self.boundary.stop or self.step % self.iters_per_epoch == 0:
                self._end_epoch(epoch)
            if self.step < self.total_steps:
                self.boundary.raise_if_stopped(self.step)
        self.boundary.uninstall()
        summary.update(steps=self.step, wall_time_s=time.time() - started,
                       nonfinite_skipped=self.guard.nonfinite_total)
        if self.dist.is_main:
            summary["encoder"] = str(self.export_teacher_encoder())
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            log.info("%s", next_steps(self.cfg, self.run_dir, summary["encoder"]))
        return summary

    def _log_step(self, result: StepResult | None, epoch: int, meter: Throughput, bar: Any,
                  summary: dict[str, Any]) -> None:
        """At a log step: read the guard's counters and sum and check the ranks' unusable clips (every rank:
        the same step, the same totals, the same verdict); then, when the step trained, log its values."""
        self.guard.sync(self.step)
        self.bad_data.reduce(self._gather, self._host_group)
        self.bad_data.check(epoch, self.iters_per_epoch * self.cfg.train.batch_size * self.dist.world_size,
                            epoch_done=False)
        if result is None or result.skipped:
            return
        values: dict[str, Any] = {k: float(v) for k, v in result.terms.items()}
        values.update(self._hp)
        values["samples_per_s"] = meter.rate()
        if self.dist.is_main and (slow := self.rate_watch.observe(values["samples_per_s"])):
            log.warning("step %d: %s", self.step, slow)
        values["epoch"] = epoch + 1  # counted from 1, as the progress bar, pictures and messages count
        values.update({k: float(v) for k, v in result.monitors.items()})
        values["center_norm_cls"] = float(self.loss_fn.center_global.norm())
        values["center_norm_tokens"] = float(self.loss_fn.center_local.norm())
        values["nonfinite_total"] = self.guard.nonfinite_total
        if self.scaler.is_enabled():  # fp16
            values["loss_scale"] = self.scaler.get_scale()
            values["scaler_overflows"] = self.guard.scaler_overflows
        if self.sync_free:
            values["gmml_shortfall"] = self.guard.gmml_shortfall_total  # read by guard.sync just before
        self.writer.write(self.step, values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", glob=f"{values['global']:.3f}",
                        local=f"{values['local']:.3f}", rec=f"{values['recon']:.3f}",
                        sps=f"{values['samples_per_s']:.1f}")
        if summary["first_loss"] is None:
            summary["first_loss"] = values["loss"]
        summary["last_loss"] = values["loss"]
        meter.reset()

    def _end_epoch(self, epoch: int) -> None:
        planned = self.iters_per_epoch * self.cfg.train.batch_size * self.dist.world_size
        self.bad_data.end_epoch(epoch, planned, self._gather, self._host_group, is_main=self.dist.is_main)
        if self.probe is not None:  # rank 0; the others wait in save_checkpoint's first collective (probe_monitor)
            self.probe.after_epoch(epoch, self.step, self.writer)
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
        (:func:`asit.encoder.export_encoder`: the format ``load_encoder`` reads)."""
        from asit.encoder import export_encoder

        d = self.cfg.data
        return export_encoder(self.teacher.backbone, self.run_dir / "teacher_encoder.safetensors",
                              sample_rate=d.sample_rate, mean=d.mean, std=d.std, arch=self.cfg.model.arch,
                              config=config_to_dict(self.cfg), step=self.step)

    def cleanup(self) -> None:
        boundary = getattr(self, "boundary", None)
        if boundary is not None:
            boundary.uninstall()
        loader = getattr(self, "loader", None)
        if loader is not None and hasattr(loader, "close"):  # DALI: its pipeline and shard index files
            loader.close()
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.release()
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
        if hasattr(self, "threads"):
            self.threads.restore()
        cleanup_distributed()
