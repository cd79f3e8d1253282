"""One fine-tuning run: :class:`Finetuner` trains a :class:`~asit.finetune.model.FinetuneModel` on one split.

``setup()`` loads the encoder, builds the model, AdamW (head and no-decay groups), the loaders and the
per-iteration learning rates (:func:`finetune_lr_schedule`); ``train()`` runs the epochs (mixup, SpecAugment,
noise on the device; bf16 autocast on CUDA), evaluates after each (:func:`evaluate_scores`: mAP or
accuracy with per-class values, gathered across DDP ranks), keeps ``best.pt`` and the weight average,
writes a resume point per epoch (``last.pt`` plus one RNG file per rank) and returns the results that
:func:`asit.finetune.run.run_finetune` stores. A resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, DistributedSampler, Subset

from asit.atomic_io import atomic_write_text
from asit.config import ConfigError
from asit.data import AudioEntry
from asit.data.fbank import batched_kaldi_fbank
from asit.data.samplers import WeightedDistributedSampler
from asit.encoder import FRAME_LENGTH_S, FRAME_SHIFT_S, backbone_spec, load_encoder
from asit.eval.linear_probe import _file_stamp, average_precision
from asit.models import build_backbone
from asit.train.cpu_threads import set_cpu_threads
from asit.train.faults import FaultHook
from asit.train.precision import autocast
from asit.train.resume import load_rng, rng_state, save_rng, set_rng_state

from .augment import SpecAugment, add_noise_and_shift, apply_mixup, sample_mixup
from .config import FinetuneConfig, FTOptimConfig, finetune_config_to_dict
from .data import LabelledClips, balanced_sample_weights, collate_clips
from .labels import LabelSpace, _targets
from .model import FinetuneModel

__all__ = ["FAULT_EPOCH_ENV", "Finetuner", "evaluate_scores", "finetune_lr_schedule"]

log = logging.getLogger(__name__)

FAULT_EPOCH_ENV = "ASIT_FT_FAULT_AFTER_EPOCH"  # tests: every process exits after this epoch's resume point


def finetune_lr_schedule(cfg: FTOptimConfig, epochs: int, iters_per_epoch: int) -> np.ndarray:
    """Learning rate of every iteration, ``[epochs · iters_per_epoch]`` float64.

    ``lr_i = base(i) · min(1, (i + 1) / warmup_steps)`` where ``base`` is

    * ``step`` (AST's ``MultiStepLR`` stepped once per epoch): ``lr · decay_factor ** n(e)`` with
      ``n(e)`` the number of milestones ``decay_start, decay_start + decay_every, …`` that are
      ``<= e`` (``e`` the 0-based epoch). AS-20K: epochs 1–10 at ``lr``, 11–15 at ``lr / 2``, …;
    * ``cosine``: ``min_lr + (lr - min_lr) · (1 + cos(π · t)) / 2`` with ``t`` going 0 → 1 from the end
      of the warm-up to the last iteration.
    """
    if epochs <= 0 or iters_per_epoch <= 0:
        raise ValueError(f"epochs and iters_per_epoch must be > 0, got {epochs}, {iters_per_epoch}")
    total = epochs * iters_per_epoch
    it = np.arange(total)
    if cfg.schedule == "step":
        epoch = it // iters_per_epoch
        decays = np.where(epoch >= cfg.decay_start, (epoch - cfg.decay_start) // cfg.decay_every + 1, 0)
        base = cfg.lr * cfg.decay_factor ** decays
    else:
        warm = min(cfg.warmup_steps, total - 1)
        t = np.clip((it - warm) / max(total - 1 - warm, 1), 0.0, 1.0)
        base = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + np.cos(np.pi * t))
    warmup = np.minimum(1.0, (it + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    return (base * warmup).astype(np.float64)


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, multilabel: bool) -> tuple[float, list[float | None]]:
    """The task metric and its per-class values.

    Multi-label: mAP over the classes with a positive, per class the AP (None without positives).
    Single-label (``targets`` ``[N, K]`` one-hot or ``[N]`` indices): top-1 accuracy, per class the
    accuracy on that class's clips (None for a class without clips).
    """
    scores = np.asarray(scores, dtype=np.float64)
    K = scores.shape[1]
    if multilabel:
        targets = np.asarray(targets) > 0.5
        per = [average_precision(scores[:, k], targets[:, k]) if targets[:, k].any() else None for k in range(K)]
        present = [v for v in per if v is not None]
        if not present:
            raise ValueError("no class has a positive example: mAP is undefined")
        return float(np.mean(present)), per
    targets = np.asarray(targets)
    truth = targets.argmax(1) if targets.ndim == 2 else targets
    correct = scores.argmax(1) == truth
    per = [float(correct[truth == k].mean()) if (truth == k).any() else None for k in range(K)]
    return float(correct.mean()), per


class Finetuner:
    """One fine-tuning run (one fold): ``setup()``, ``train()`` → results dict, ``cleanup()``.

    Args:
        cfg: the recipe.
        train_entries, val_entries: the clips.
        labels: the class list.
        multilabel: task type (decides the loss and the metric).
        run_dir: where this run writes.
        test_entries: clips scored once after training with the reported model (none: no test score).
    """

    def __init__(self, cfg: FinetuneConfig, train_entries: Sequence[AudioEntry], val_entries: Sequence[AudioEntry],
                 labels: LabelSpace, multilabel: bool, run_dir: str | Path,
                 test_entries: Sequence[AudioEntry] = ()) -> None:
        from asit.train.distributed import init_distributed

        self.cfg, self.labels, self.multilabel = cfg, labels, multilabel
        self.train_entries, self.val_entries = list(train_entries), list(val_entries)
        self.test_entries = list(test_entries)
        self.run_dir = Path(run_dir)
        self.dist = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.fault = FaultHook(self.run_dir, self.dist.rank, self.dist.world_size, env=FAULT_EPOCH_ENV,
                               every_rank=True)
        loss = cfg.optim.loss if cfg.optim.loss != "auto" else ("bce" if multilabel else "ce")
        self.loss_kind = loss
        self.metric = "mAP" if multilabel else "accuracy"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        # on the CPU: one torch thread per usable core less one per loader worker (as pretraining does)
        self.threads = set_cpu_threads(self.device, d.num_workers, announce=self.dist.is_main)
        torch.manual_seed(cfg.train.seed)
        encoder = load_encoder(cfg.encoder, random_init=cfg.model.random_init, seed=cfg.train.seed)
        self.encoder_meta = dict(encoder.metadata)
        self.sample_rate, self.num_mel_bins = encoder.sample_rate, encoder.num_mel_bins
        if d.mean is not None:
            self.mean, self.std, self._stats_source = d.mean, d.std, "config"
        elif d.stats == "corpus":
            (self.mean, self.std), self._stats_source = self._corpus_stats(), "corpus"
        else:
            self.mean, self.std, self._stats_source = encoder.mean, encoder.std, "encoder"
        self.frames = d.target_frames or encoder.target_frames
        if self.frames % encoder.patch_size:
            raise ConfigError(f"data.target_frames={self.frames} is not a multiple of the patch size "
                              f"{encoder.patch_size}")
        spec = backbone_spec(encoder.backbone.state_dict(), self.encoder_meta)
        backbone = build_backbone(**spec, drop_path_rate=cfg.model.drop_path_rate)
        backbone.load_state_dict(encoder.backbone.state_dict())
        del encoder
        self.model = FinetuneModel(backbone, self.labels.num_classes, cfg.model.pool,
                                   cfg.model.pos_embed_fit).to(self.device)
        self.ddp_model: nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        o = cfg.optim
        head = list(self.model.head.parameters())
        head_ids = {id(p) for p in head}
        groups = []
        for params, scale in (([p for p in self.model.parameters() if id(p) not in head_ids], 1.0),
                              (head, o.head_lr_scale)):
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]  # biases, norms, tokens' 1-D params
            groups += [{"params": decay, "weight_decay": o.weight_decay, "lr_scale": scale},
                       {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=o.betas)

        window = int(self.sample_rate * FRAME_LENGTH_S)
        shift = int(self.sample_rate * FRAME_SHIFT_S)
        num_samples = window + (self.frames - 1) * shift
        self.train_targets = _targets(self.train_entries, self.labels, "train")
        self.train_set = LabelledClips(self.train_entries, self.train_targets, sample_rate=self.sample_rate,
                                       num_samples=num_samples, train=True, seed=cfg.train.seed)
        r, w = self.dist.rank, self.dist.world_size
        if d.balanced_sampling:
            weights = balanced_sample_weights(self.train_targets)
            self.sampler = WeightedDistributedSampler(weights.tolist(), len(self.train_set), rank=r, world_size=w,
                                                      seed=cfg.train.seed, tag_repeats=True)
        else:
            self.sampler = DistributedSampler(self.train_set, num_replicas=w, rank=r, shuffle=True,
                                              seed=cfg.train.seed, drop_last=False)
        loader_kw = dict(num_workers=d.num_workers, collate_fn=collate_clips,
                         pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.train.batch_size, sampler=self.sampler,
                                       drop_last=len(self.sampler) > cfg.train.batch_size, **loader_kw)

        def eval_loader(entries: list[AudioEntry], split: str) -> DataLoader:
            # every world_size-th clip per rank; predict() gathers them and puts them back in order
            clips = LabelledClips(entries, _targets(entries, self.labels, split), sample_rate=self.sample_rate,
                                  num_samples=num_samples, train=False, all_windows=cfg.train.eval_windows == "all")
            return DataLoader(Subset(clips, list(range(len(clips)))[r::w]),
                              batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size, shuffle=False,
                              **loader_kw)

        self.val_loader = eval_loader(self.val_entries, "val")
        self.test_loader = eval_loader(self.test_entries, "test") if self.test_entries else None
        steps = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        self.iters_per_epoch = steps
        self.lr_schedule = finetune_lr_schedule(o, cfg.train.epochs, steps)
        self.specaug = SpecAugment(cfg.augment.freqm, cfg.augment.timem)
        self.mix_rng = np.random.default_rng([cfg.train.seed, self.dist.rank])
        p = cfg.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if p == "bf16" else None

        from asit.train.metrics import MetricWriter

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "config.yaml", "w", encoding="utf-8") as fh:
                yaml.safe_dump(finetune_config_to_dict(cfg), fh, sort_keys=False)
        self.writer = MetricWriter(self.run_dir, enabled=self.dist.is_main)

    # ------------------------------------------------------------------ steps
    def features(self, waves: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, S]`` → normalised fbank ``[B, 1, T, F]``."""
        fbank = batched_kaldi_fbank(waves, self.sample_rate, self.num_mel_bins, self.frames,
                                    normalize=(self.mean, self.std))  # [B, T, F]
        return fbank.unsqueeze(1)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, target)  # soft (mixed) targets are class probabilities

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> float:
        a = self.cfg.augment
        wave = batch["wave"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        if a.mixup_prob > 0:
            lam, partner = sample_mixup(wave.shape[0], a.mixup_alpha, a.mixup_prob, self.mix_rng)
            wave, target = apply_mixup(wave, target, lam, partner)
        with torch.no_grad():
            x = self.specaug(self.features(wave))
            if a.noise:
                x = add_noise_and_shift(x)
        lr = float(self.lr_schedule[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        with autocast(self.device, self.autocast_dtype):
            logits = self.ddp_model(x)
        loss = self._loss(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        return float(loss.detach())

    def _batch_empty_anywhere(self, batch: dict[str, Any]) -> bool:
        """True when this rank's batch or any other rank's has no decodable clip. Ranks must skip
        together, or DDP's gradient all-reduce would pair up different steps and hang."""
        empty = batch["wave"].shape[0] == 0
        if not self.dist.distributed:
            return empty
        flag = torch.tensor([float(empty)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one tiny collective per step under DDP
        return bool(flag.item())

    @torch.no_grad()
    def predict(self, loader: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores (sigmoid or softmax) and targets of the validation clips (or ``loader``'s), gathered
        from all ranks."""
        self.model.eval()
        scores, targets, order = [], [], []
        for batch in self.val_loader if loader is None else loader:
            if batch["wave"].numel() == 0:
                continue
            with autocast(self.device, self.autocast_dtype):
                logits = self.model(self.features(batch["wave"].to(self.device))).float()
            prob = (torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, -1)).cpu()
            if "owner" in batch:  # several windows per clip: the mean of their scores
                clips = batch["target"].shape[0]
                counts = torch.bincount(batch["owner"], minlength=clips).unsqueeze(1).to(prob.dtype)
                prob = prob.new_zeros(clips, prob.shape[1]).index_add_(0, batch["owner"], prob) / counts
            scores.append(prob)
            targets.append(batch["target"])
            order.append(batch["index"])  # positions in the whole validation set
        self.model.train()
        part = (torch.cat(scores).numpy(), torch.cat(targets).numpy(), torch.cat(order).numpy()) if scores else None
        parts = [part]
        if self.dist.distributed:
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, part)
        parts = [p for p in parts if p is not None]
        if not parts:
            raise RuntimeError("no evaluation clip could be decoded")
        s, t, idx = (np.concatenate(x) for x in zip(*parts))
        keep = np.argsort(idx, kind="stable")
        return s[keep], t[keep]

    def evaluate(self, loader: Any = None) -> dict[str, Any]:
        """The metric, per-class values and clip count on the validation clips (or ``loader``'s)."""
        scores, targets = self.predict(loader)
        value, per_class = evaluate_scores(scores, targets, self.multilabel)
        return {self.metric: value, "per_class": dict(zip(self.labels.names, per_class)), "n_clips": len(scores)}

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs, evaluating after each; returns the run's results."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        avg_start = t.average_start
        avg_end = min(t.average_end or t.epochs, t.epochs)
        averaged: dict[str, torch.Tensor] | None = None
        n_avg = 0
        best: dict[str, Any] | None = None
        history = []
        step = 0
        started = time.time()
        start_epoch, ev = 0, None
        resumed = self._load_resume_point() if t.resume else None
        if resumed is not None:
            start_epoch, step = resumed["epoch"], resumed["step"]
            best, history, ev = resumed["best"], resumed["history"], resumed["last_eval"]
            averaged, n_avg = resumed["averaged"], resumed["n_avg"]
            started -= resumed["wall_time_s"]
        self.model.train()
        for epoch in range(start_epoch, t.epochs):
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", dynamic_ncols=True,
                       disable=not (self.dist.is_main and t.progress), leave=False)
            losses = []
            for i, batch in enumerate(self.train_loader):
                if i >= self.iters_per_epoch:
                    break
                if self._batch_empty_anywhere(batch):  # every clip undecodable, on some rank
                    step += 1
                    continue
                loss = self.train_step(batch, step)
                step += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_schedule[step - 1]:.2e}")
                if step % t.log_every == 0:
                    self.writer.write(step, {"loss": loss, "lr": float(self.lr_schedule[step - 1]), "epoch": epoch + 1})
            bar.close()
            ev = self.evaluate()
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                      self.metric: ev[self.metric]}
            history.append(record)
            self.writer.write(step, {"epoch": epoch + 1, f"val_{self.metric}": ev[self.metric],
                                     "train_loss_epoch": record["train_loss"]})
            self.writer.flush()
            if self.dist.is_main:
                log.info("epoch %d/%d: train loss %.4f, val %s %.4f", epoch + 1, t.epochs,
                         record["train_loss"] or float("nan"), self.metric, ev[self.metric])
            if best is None or ev[self.metric] > best[self.metric]:
                best = {"epoch": epoch + 1, **ev}
                if t.save_best:
                    self._save("best.pt", self.model.state_dict(), epoch + 1, ev[self.metric])
            if avg_start is not None and avg_start <= epoch + 1 <= avg_end:
                # a copy: on the CPU .float().cpu() would alias the live weights (and += would train them)
                state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in self.model.state_dict().items()}
                n_avg += 1
                if averaged is None:
                    averaged = state
                else:  # running mean
                    for k, v in state.items():
                        averaged[k] += (v - averaged[k]) / n_avg
            self._save_resume_point({
                "epoch": epoch + 1, "step": step, "best": best, "history": history, "last_eval": ev,
                "averaged": averaged, "n_avg": n_avg, "wall_time_s": time.time() - started,
            })
            self.fault(epoch + 1)  # test hook (FAULT_EPOCH_ENV): every process dies like a killed worker
        assert ev is not None  # train.epochs > 0 is validated, and a resume point holds its last evaluation
        last = {"epoch": t.epochs, **ev}
        result: dict[str, Any] = {"metric": self.metric, "best": best, "last": last, "history": history,
                                  "steps": step, "wall_time_s": time.time() - started,
                                  "normalization": {"mean": self.mean, "std": self.std, "source": self._stats_source}}
        if averaged is not None:
            with self._weights(averaged):
                ev_avg = self.evaluate()
                result["averaged"] = {"epochs": [avg_start, avg_end], "n_models": n_avg, **ev_avg}
                self._save("averaged.pt", self.model.state_dict(), t.epochs, ev_avg[self.metric])
            self.writer.write(step, {"epoch": t.epochs, f"val_{self.metric}_averaged": ev_avg[self.metric]})
        chosen = result[t.report]
        result.update(value=chosen[self.metric], per_class=chosen["per_class"], report=t.report,
                      value_split="val", val_value=chosen[self.metric])
        if self.test_loader is not None:
            test = self._test(t.report, averaged)
            result["test"] = {"model": t.report, "epoch": chosen.get("epoch", t.epochs), **test}
            result.update(value=test[self.metric], per_class=test["per_class"], value_split="test")
            self.writer.write(step, {"epoch": t.epochs, f"test_{self.metric}": test[self.metric]})
            if self.dist.is_main:
                log.info("test %s of the %s model: %.4f (validation %.4f)", self.metric, t.report,
                         test[self.metric], chosen[self.metric])
        self.writer.flush()
        if self.dist.is_main:
            _write_json(self.run_dir / "results.json", result)
        return result

    def _test(self, report: str, averaged: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Evaluate the reported model (``best`` from ``best.pt``, ``last``, ``averaged``) on the test clips."""
        if report == "last":
            return self.evaluate(self.test_loader)
        if report == "best":
            from asit.train.checkpoint import load_checkpoint

            state = load_checkpoint(self.run_dir / "best.pt", required=("model",))["model"]
        else:
            assert averaged is not None  # report=averaged needs average_start (validated)
            state = averaged
        with self._weights(state):
            return self.evaluate(self.test_loader)

    @contextlib.contextmanager
    def _weights(self, state: dict[str, torch.Tensor]):
        """Run the block with ``state`` loaded into the model, then put the current weights back."""
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()})
        try:
            yield
        finally:
            self.model.load_state_dict(current)

    def _save(self, name: str, state: dict[str, torch.Tensor], epoch: int, value: float) -> None:
        if not self.dist.is_main:
            return
        from asit.train.checkpoint import atomic_save

        atomic_save({
            "model": {k: v.detach().cpu() for k, v in state.items()},
            "epoch": epoch, "metric": self.metric, "value": value,
            "classes": list(self.labels.names), "pool": self.cfg.model.pool,
            "pos_embed_fit": self.cfg.model.pos_embed_fit,
            "normalization": {"mean": self.mean, "std": self.std},  # the fbank statistics the model was trained on
            "config": finetune_config_to_dict(self.cfg), "encoder_metadata": self.encoder_meta,
        }, self.run_dir / name)

    def _corpus_stats(self) -> tuple[float, float]:
        """``data.stats=corpus``: fbank mean and std of the training clips at the encoder's sample rate and
        mel bins (:func:`~asit.data.stats.compute_fbank_stats`). Rank 0 computes them once, caches them in
        ``fbank_stats.json`` in its run folder (keyed by the clips and settings, so a resumed run reuses
        them) and broadcasts them, so every rank uses the same values without reading that file, and an
        error on rank 0 stops every rank instead of leaving them waiting."""
        from asit.data.stats import compute_fbank_stats

        path = self.run_dir / "fbank_stats.json"
        holder: list[Any] = [None]
        if self.dist.is_main:
            try:
                digest = hashlib.sha256()
                for e in self.train_entries:  # audio rewritten at the same paths invalidates the cache too
                    size, mtime = _file_stamp(e.path)  # (None, None) when unreadable: skipped by the stats
                    digest.update(f"{e.path}\0{size}\0{mtime}\n".encode())
                key = {"sample_rate": self.sample_rate, "num_mel_bins": self.num_mel_bins,
                       "clips": digest.hexdigest()}
                try:
                    doc = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    doc = None
                if not (isinstance(doc, dict) and doc.get("key") == key):
                    log.info("data.stats=corpus: fbank statistics of %d training clips", len(self.train_entries))
                    stats = compute_fbank_stats(self.train_entries, sample_rate=self.sample_rate,
                                                num_mel_bins=self.num_mel_bins, num_workers=self.cfg.data.num_workers,
                                                progress=self.cfg.train.progress)
                    doc = {"key": key, "mean": stats.mean, "std": stats.std, "clips": stats.clips,
                           "skipped": stats.skipped}
                    atomic_write_text(path, json.dumps(doc, indent=1))
                holder = [(float(doc["mean"]), float(doc["std"]))]
                log.info("fbank statistics of the training clips: mean %.4f, std %.4f (%s)", *holder[0], path)
            except Exception as err:  # every rank must hear of it
                holder = [f"{type(err).__name__}: {err}"]
                if not self.dist.distributed:
                    raise
        if self.dist.distributed:
            dist.broadcast_object_list(holder, src=0)
        if isinstance(holder[0], str):
            raise ValueError(f"data.stats=corpus: computing the fbank statistics failed on rank 0: {holder[0]}")
        return holder[0]

    def _save_resume_point(self, progress: dict[str, Any]) -> None:
        """After an epoch: every rank writes its RNG states, then rank 0 writes ``last.pt``, which
        names that epoch (so a crash between the two leaves the previous, complete resume point)."""
        from asit.train.checkpoint import atomic_save

        epoch, rank = progress["epoch"], self.dist.rank
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.distributed:
            dist.barrier()
        save_rng(self.run_dir, f"epoch{epoch:04d}", rank,
                 rng_state(cuda=self.device.type == "cuda", device=self.device,
                           mixup=json.dumps(self.mix_rng.bit_generator.state)))
        if self.dist.distributed:
            dist.barrier()
        if self.dist.is_main:
            atomic_save({"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                         "optimizer": self.optimizer.state_dict(), "config": finetune_config_to_dict(self.cfg),
                         "iters_per_epoch": self.iters_per_epoch, "world_size": self.dist.world_size,
                         **progress}, self.run_dir / "last.pt")
        if self.dist.distributed:
            dist.barrier()
        for old in self.run_dir.glob(f"rng_epoch*_rank{rank}.pt*"):
            if not old.name.startswith(f"rng_epoch{epoch:04d}_"):
                old.unlink(missing_ok=True)

    def _load_resume_point(self) -> dict[str, Any] | None:
        """Restore model, optimiser and this rank's RNG states from ``last.pt``; None when absent."""
        from asit.train.checkpoint import load_checkpoint

        path = self.run_dir / "last.pt"
        if not path.exists():
            log.info("no %s yet: starting from scratch", path)
            return None
        state = load_checkpoint(path, map_location="cpu", required=("model", "optimizer", "epoch", "step"))
        mismatched = [f"{k}: {state[k]} there, {v} here" for k, v in (
            ("iters_per_epoch", self.iters_per_epoch), ("world_size", self.dist.world_size))
            if state[k] != v]
        saved_train = state["config"]["train"]
        if saved_train["epochs"] != self.cfg.train.epochs:
            mismatched.append(f"train.epochs: {saved_train['epochs']} there, {self.cfg.train.epochs} here")
        if mismatched:
            raise ConfigError(f"cannot resume from {path}: " + "; ".join(mismatched))
        rng = load_rng(self.run_dir, f"epoch{state['epoch']:04d}", self.dist.rank, required=("torch", "mixup"),
                       checkpoint=path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(rng, cuda=self.device.type == "cuda", device=self.device)
        self.mix_rng.bit_generator.state = json.loads(rng["mixup"])
        if self.dist.is_main:  # the interrupted epoch's records would otherwise appear twice
            from asit.train.metrics import trim_log

            trim_log(self.run_dir / "log.jsonl", state["step"])
        log.info("resuming %s after epoch %d (step %d)", self.run_dir, state["epoch"], state["step"])
        return state

    def cleanup(self) -> None:
        self.writer.close()
        if hasattr(self, "threads"):
            self.threads.restore()


def _write_json(path: Path, obj: Any) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    atomic_write_text(path, json.dumps(clean(obj), indent=2) + "\n")
