"""Representation quality while pretraining: rank 0 embeds a small labelled set with the teacher's backbone
every ``eval.every_epochs`` epochs and logs two accuracies beside the losses.

* ``probe/knn_acc``: DINO's weighted k-NN on the clip embeddings ([CLS], averaged over the clip's windows):
  cosine similarity, the ``eval.knn_k`` (20) most similar clips vote with weight
  ``exp(similarity / eval.knn_temperature)`` (T = 0.07). Scored **leave-one-out** (every clip is classified
  by the others): no split to draw, so the number is deterministic and uses every labelled clip.
* ``probe/linear_acc`` (and ``probe/linear_acc_std`` over folds): the downstream linear probe
  (:func:`asit.train.probes.cross_validate`, standardised features, L-BFGS logistic regression) with
  ``eval.linear_folds`` stratified folds.
* ``probe/seconds``: the wall time the evaluation took.

The probe clips never change, so their fbank windows are computed once, when the monitor is built, with
the front end of :class:`asit.encoder.AudioEncoder` (waveform padding, Kaldi fbank, normalisation with
``data.mean`` / ``data.std``, windows of ``data.target_frames`` frames, the last one ending at the clip's
end): each evaluation only runs the backbone, under the training autocast, with the RNG states forked
(the probe draws no random number the training would see, so enabling it leaves the training unchanged).

Only rank 0 evaluates. It does so in :meth:`Pretrainer._end_epoch` just before the epoch's checkpoint, whose
writing starts with collectives every rank joins (the bad-data counters' all-gather, then barriers): the
other ranks go on to the first of them and wait there exactly as long as rank 0 computes, so no extra
barrier is needed. The wait counts against the process group's timeout (30 minutes,
:func:`asit.train.distributed.init_distributed`), so keep the probe set small (hundreds to a few thousand
clips: seconds on a GPU).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from asit.config import Config, ConfigError
from asit.data import AudioDecodeError, AudioEntry, load_audio, load_manifest
from asit.encoder import AudioEncoder

from .loaders import demo_manifest
from .metrics import MetricWriter
from .precision import autocast
from .probes import ProbeConfig, cross_validate, knn_accuracy

__all__ = ["ProbeClips", "ProbeMonitor", "cache_probe_clips", "probe_scores", "resolve_probe_manifest"]

log = logging.getLogger(__name__)


def probe_scores(features: np.ndarray, labels: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                 folds: int = 3, seed: int = 0) -> dict[str, float]:
    """The monitor's scores of clip embeddings ``features`` ``[N, D]`` with class indices ``labels`` ``[N]``:
    ``probe/knn_acc`` (leave-one-out weighted k-NN), ``probe/linear_acc`` and ``probe/linear_acc_std``
    (the mean and standard deviation over ``folds`` stratified folds of the linear probe, split by ``seed``).
    """
    labels = np.asarray(labels, dtype=np.int64)
    linear = cross_validate(features, [(str(c),) for c in labels], ProbeConfig(folds=folds, seed=seed))
    return {
        "probe/knn_acc": knn_accuracy(features, labels, k=k, temperature=temperature),
        "probe/linear_acc": linear["mean"],
        "probe/linear_acc_std": linear["std"],
    }


@dataclass
class ProbeClips:
    """The probe set, ready for the backbone.

    Attributes:
        windows: ``[W, 1, target_frames, F]`` float32 normalised fbank windows of every clip (CPU).
        owner: ``[W]`` index of the clip each window belongs to.
        labels: ``[N]`` class index of each clip.
        classes: the class names, sorted; ``labels`` index them.
        skipped: clips that could not be decoded, counted by reason.
    """

    windows: torch.Tensor
    owner: torch.Tensor
    labels: np.ndarray
    classes: list[str]
    skipped: dict[str, int]


def cache_probe_clips(encoder: AudioEncoder, entries: list[AudioEntry], *, source: str = "eval.probe_manifest"
                      ) -> ProbeClips:
    """Decode ``entries`` and cut their fbank windows with ``encoder``'s front end (as
    :meth:`AudioEncoder.embed` does); undecodable clips are skipped and counted.

    Raises:
        ConfigError: naming ``source``, when a clip has no label or several, fewer than two classes remain,
            or no clip could be decoded.
    """
    bad = [e.path for e in entries if len(e.labels) != 1]
    if bad:
        raise ConfigError(f"{source}: the probe needs exactly one label per clip; {len(bad)} clip(s) have none or "
                         f"several, e.g. {bad[0]}")
    windows, owner, names, skipped = [], [], [], Counter()
    for entry in entries:
        try:
            wave = load_audio(entry.path, encoder.sample_rate)
        except AudioDecodeError as err:
            log.warning("probe set: skipping %s", err)
            skipped[err.reason] += 1
            continue
        frames = encoder.num_fbank_frames(wave.numel())
        fbank = encoder.features(wave, max(frames, encoder.target_frames))[0]  # [1, max(L, window), F]
        for start in encoder.window_starts(frames):
            windows.append(fbank[:, start:start + encoder.target_frames])
            owner.append(len(names))
        names.append(entry.labels[0])
    if not names:
        raise ConfigError(f"{source}: none of the {len(entries)} clips could be decoded")
    classes = sorted(set(names))
    if len(classes) < 2:
        raise ConfigError(f"{source}: the probe needs at least 2 classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return ProbeClips(windows=torch.stack(windows), owner=torch.tensor(owner),
                      labels=np.array([index[c] for c in names]), classes=classes, skipped=dict(skipped))


def resolve_probe_manifest(cfg: Config) -> str:
    """The file behind ``eval.probe_manifest``: ``demo`` is the built-in demo corpus as ``data.demo_*``,
    ``data.sample_rate``, ``data.cache_dir`` and ``train.seed`` make it (the pretraining data itself when
    ``data.train_manifest`` is ``demo`` too)."""
    source = cfg.eval.probe_manifest
    return demo_manifest(cfg) if source == "demo" else str(source)


class ProbeMonitor:
    """k-NN and linear-probe accuracy of a backbone's embeddings of a fixed labelled set.

    Args:
        encoder: an :class:`AudioEncoder` around the backbone being trained (the teacher's); it shares the
            backbone's parameters, so each evaluation sees the current weights.
        clips: the cached probe set (:func:`cache_probe_clips`).
        every_epochs: evaluate after epochs ``every_epochs``, ``2·every_epochs``, … and after the last one.
        epochs: the run's length (``train.epochs``).
        amp_dtype: the training autocast dtype (None: fp32).
    """

    def __init__(self, encoder: AudioEncoder, clips: ProbeClips, *, every_epochs: int, epochs: int,
                 knn_k: int = 20, knn_temperature: float = 0.07, linear_folds: int = 3,
                 amp_dtype: torch.dtype | None = None, batch_size: int = 64) -> None:
        self.encoder, self.clips = encoder, clips
        self.every_epochs, self.epochs = every_epochs, epochs
        self.knn_k, self.knn_temperature, self.linear_folds = knn_k, knn_temperature, linear_folds
        self.amp_dtype, self.batch_size = amp_dtype, batch_size

    @classmethod
    def from_config(cls, cfg: Config, backbone: torch.nn.Module, *, amp_dtype: torch.dtype | None = None
                    ) -> ProbeMonitor:
        """The monitor ``cfg.eval`` asks for, on ``backbone`` (the teacher's), with the probe clips decoded and
        their fbank windows cached now (errors name ``eval.probe_manifest`` before training starts)."""
        d, e = cfg.data, cfg.eval
        manifest = resolve_probe_manifest(cfg)
        encoder = AudioEncoder(backbone, sample_rate=d.sample_rate, num_mel_bins=d.num_mel_bins, mean=d.mean,
                               std=d.std)
        started = time.time()
        clips = cache_probe_clips(encoder, load_manifest(manifest), source=f"eval.probe_manifest ({manifest})")
        n, w = len(clips.labels), clips.windows.shape[0]
        log.info("probe set %s: %d clips, %d classes, %d windows (%.0f MB of fbank) cached in %.1f s; "
                 "k-NN and linear probe every %d epoch(s)", manifest, n, len(clips.classes), w,
                 clips.windows.numel() * 4 / 2**20, time.time() - started, e.every_epochs)
        if len(clips.labels) < e.linear_folds:
            raise ConfigError(f"eval.probe_manifest ({manifest}): {n} clips are fewer than eval.linear_folds="
                             f"{e.linear_folds}")
        return cls(encoder, clips, every_epochs=e.every_epochs, epochs=cfg.train.epochs, knn_k=e.knn_k,
                   knn_temperature=e.knn_temperature, linear_folds=e.linear_folds, amp_dtype=amp_dtype)

    def due(self, epoch: int) -> bool:
        """Whether to evaluate at the end of (0-based) ``epoch``."""
        return (epoch + 1) % self.every_epochs == 0 or epoch + 1 == self.epochs

    @torch.no_grad()
    def embed(self) -> np.ndarray:
        """``[N, D]`` clip embeddings: the backbone's [CLS] of each window, averaged over the clip's windows."""
        device, windows = self.encoder.device, self.clips.windows
        out = []
        with autocast(device, self.amp_dtype):
            for i in range(0, windows.shape[0], self.batch_size):
                x = windows[i:i + self.batch_size].to(device, non_blocking=True)
                out.append(self.encoder.forward_windows(x)[:, 0].float().cpu())  # [b, D]
        cls = torch.cat(out).double()  # [W, D]
        n = len(self.clips.labels)
        total = torch.zeros(n, cls.shape[1], dtype=cls.dtype).index_add_(0, self.clips.owner, cls)
        count = torch.bincount(self.clips.owner, minlength=n).to(cls.dtype)
        return (total / count[:, None]).numpy()

    def evaluate(self) -> dict[str, float]:
        """Embed the probe set and score it (:func:`probe_scores`); ``probe/seconds`` is the time taken. The
        global RNG states are restored afterwards."""
        started = time.time()
        device = self.encoder.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            values = probe_scores(self.embed(), self.clips.labels, k=self.knn_k, temperature=self.knn_temperature,
                                  folds=self.linear_folds)
        values["probe/seconds"] = time.time() - started
        return values

    def after_epoch(self, epoch: int, step: int, writer: MetricWriter) -> dict[str, Any] | None:
        """At the end of ``epoch``: evaluate when :meth:`due` and write the scores at ``step``; returns them."""
        if not self.due(epoch):
            return None
        values: dict[str, Any] = {**self.evaluate(), "epoch": epoch}
        writer.write(step, values)
        log.info("epoch %d: probe k-NN %.3f, linear %.3f ± %.3f (%.1f s)", epoch + 1, values["probe/knn_acc"],
                 values["probe/linear_acc"], values["probe/linear_acc_std"], values["probe/seconds"])
        return values
