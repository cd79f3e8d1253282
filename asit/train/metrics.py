"""Run outputs for humans and tools: a JSON-lines log and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from asit.atomic_io import atomic_write_text

__all__ = ["MetricWriter", "RateWatch", "Throughput", "collapse_monitors", "softmax_entropy", "trim_log"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def softmax_entropy(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean entropy (nats) of ``softmax((logits - center) / temp)`` over rows, a 0-d tensor on the
    logits' device (read it when logging: no host sync here); its maximum is ``log K``. A teacher
    collapsing to one class drives it to 0, a uniform teacher to ``log K``."""
    p = torch.softmax((logits.detach().float().reshape(-1, logits.shape[-1]) - center) / temp, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def collapse_monitors(teacher_out: dict[str, torch.Tensor], center_global: torch.Tensor, center_local: torch.Tensor,
                      temp: float) -> dict[str, torch.Tensor]:
    """Collapse monitors: the teacher's entropy per head (max log K) with the step's centres and
    temperature; 0-d device tensors, read when the step is logged. With a fused head (``loss.fused_head``) the
    token logits are made here from ``token_embed`` and ``token_weight``, in fp32, on monitored steps only."""
    tokens = teacher_out.get("token_logits")
    if tokens is None:
        tokens = torch.nn.functional.linear(teacher_out["token_embed"].float(), teacher_out["token_weight"].float())
    return {
        "teacher_entropy_cls": softmax_entropy(teacher_out["cls_logits"], center_global, temp),
        "teacher_entropy_tokens": softmax_entropy(tokens, center_local, temp),
    }


class Throughput:
    """Samples per second over a window that :meth:`reset` restarts."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.samples = time.time(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        return self.samples / max(time.time() - self.start, 1e-9)


class RateWatch:
    """Notices when the samples/s of a run fall far below the run's own earlier rate.

    :meth:`observe` takes each log window's rate. The first ``warmup`` windows (compilation, first
    batches) set no standard; after them the best rate seen is the standard. When ``patience`` windows
    in a row run below ``factor`` times it (one slow window, e.g. loader workers starting at an epoch's
    start, is not enough), :meth:`observe` returns a warning, once, until the rate recovers to half the
    best. On a CPU the usual cause is another process on the same cores (torch's threads oversubscribed).
    """

    def __init__(self, *, cpu: bool = True, warmup: int = 2, factor: float = 1 / 3, patience: int = 2) -> None:
        self.cpu, self.warmup, self.factor, self.patience = cpu, warmup, factor, patience
        self.seen = self.slow = 0
        self.best = 0.0
        self.warned = False

    def observe(self, rate: float) -> str | None:
        """Record one window's samples/s; the warning to log when the rate has collapsed, else None."""
        self.seen += 1
        if self.seen <= self.warmup or not math.isfinite(rate):
            return None
        self.best = max(self.best, rate)
        if rate >= self.best / 2:
            self.slow, self.warned = 0, False
            return None
        self.slow = self.slow + 1 if rate < self.factor * self.best else 0
        if self.slow < self.patience or self.warned:
            return None
        self.warned = True
        cause = ("another process may be using the cores (set OMP_NUM_THREADS; the log's start names the threads "
                 "chosen)" if self.cpu else "another job may share the device, or the input pipeline has slowed")
        return f"samples/s fell to {rate:.1f} from {self.best:.1f} — {cause}"


def _json_value(value: Any) -> Any:
    """NaN/Inf become ``null``: the log stays strict JSON (readable by jq, browsers, pandas)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricWriter:
    """Appends one JSON object per log step to ``<run>/log.jsonl`` and mirrors scalars to TensorBoard.

    Non-finite values are written as ``null``; records with an ``"event"`` key mark incidents
    (e.g. ``"nonfinite_skip"``) rather than regular log steps."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _json_value(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def trim_log(path: Path, step: int) -> None:
    """Drop the records a crashed run logged after ``step`` (the step resumed from) and any line it left
    unfinished, so the resumed run's log holds every step once."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            ok = False
        if ok:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
        logger.info("%s: dropped %d record(s) written after step %d by the interrupted run", path, dropped, step)
