"""The non-finite guard of a training step.

A step whose loss terms or gradient norm hold a NaN or Inf on any rank must not update anything: the
guard flags those values (:meth:`NonFiniteGuard.flags`), then applies or skips the step's updates
(:meth:`NonFiniteGuard.step_or_skip`: optimiser, loss centres, teacher EMA). Checked on the host it reads
the flags at once (one sync per step); sync-free it skips on the device (fused AdamW's ``found_inf``,
``torch.where`` on the centres, EMA momentum 1) and keeps its counters there until
:meth:`NonFiniteGuard.sync` reads them at a log step, checkpoint or epoch end. fp16 loss-scale overflows are
the scaler's routine skips, counted apart. Too many steps in a row without an update raise
:class:`NonFiniteLossError`. The guard takes every setting as an argument and never reads the config; its
counters are saved in the checkpoint under ``nonfinite``, ``scaler_overflows`` and ``gmml_shortfall``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["FLAG_NAMES", "NonFiniteGuard", "NonFiniteLossError", "StepResult"]

log = logging.getLogger(__name__)

FLAG_NAMES = ("global", "local", "recon", "grad_norm")  # what the guard checks, in this order


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss term or gradient norm."""


@dataclass
class StepResult:
    """What one call of :meth:`Pretrainer.train_step` did.

    ``terms``: detached ``loss``, ``global``, ``local``, ``recon`` and ``grad_norm`` (device tensors,
    no host sync). ``flags``: per name in ``global``/``local``/``recon``/``grad_norm``, 1 where it was
    NaN/Inf on some rank (a device tensor). ``nonfinite`` reads them (a host sync, done at once unless
    the step runs sync-free): the names that were non-finite; non-empty means the step was skipped: no
    optimiser, teacher or centre update, except on an fp16 loss-scale overflow (``scaler_overflow``: with
    loss scaling on, only the gradient norm was non-finite), where the scaler skips the optimiser step
    and the teacher and centres update as in the authors' loop. ``monitors``: collapse monitors as 0-d
    device tensors (only when asked for). ``scaling``: the step ran with fp16 loss scaling.
    """

    terms: dict[str, torch.Tensor]
    flags: torch.Tensor | None = None
    monitors: dict[str, torch.Tensor] = field(default_factory=dict)
    scaling: bool = False
    _nonfinite: list[str] | None = field(default=None, repr=False)

    @property
    def nonfinite(self) -> list[str]:
        if self._nonfinite is None:
            bad = self.flags.tolist() if self.flags is not None else [0] * len(FLAG_NAMES)
            self._nonfinite = [k for k, f in zip(FLAG_NAMES, bad, strict=True) if f]
        return self._nonfinite

    @property
    def skipped(self) -> bool:
        return bool(self.nonfinite)

    @property
    def scaler_overflow(self) -> bool:
        """The loss scaler's overflow: finite loss terms, a non-finite gradient norm, fp16 loss scaling on."""
        return self.scaling and self.nonfinite == ["grad_norm"]


class NonFiniteGuard:
    """Skips the updates of steps with a NaN/Inf loss term or gradient norm and stops a run of them.

    Args:
        device: where the flags and the sync-free counters live.
        sync_free: skip on the device and report at :meth:`sync` (no host read per step).
        max_consecutive: steps in a row without an optimiser update that stop the run (``max_consecutive``
            may be changed between steps).
        distributed: OR the flags over all ranks (an all-reduce).
        is_main: this process logs and reports the events.
        checkpoints: the folder named in the stop message.
        candidate_budget: GMML's candidate blocks (named in the shortfall warning).
        events: called with ``(step, record)`` for each incident record (the run's JSON log).

    Counters: ``nonfinite_total`` (skipped steps), ``nonfinite_consecutive`` (steps in a row without an
    optimiser update, fp16 overflows included), ``scaler_overflows``, ``gmml_shortfall_total`` (sync-free
    GMML samples left below their target); ``shortfall`` is the device-side tally the recipe adds to.
    """

    def __init__(self, device: torch.device, *, sync_free: bool, max_consecutive: int, distributed: bool,
                 is_main: bool, checkpoints: Path, candidate_budget: int,
                 events: Callable[[int, dict[str, Any]], None]) -> None:
        self.device, self.sync_free, self.max_consecutive = device, sync_free, max_consecutive
        self.distributed, self.is_main, self.checkpoints = distributed, is_main, checkpoints
        self.candidate_budget, self.events = candidate_budget, events
        self.nonfinite_total = 0
        self.nonfinite_consecutive = 0
        self.scaler_overflows = 0
        self.gmml_shortfall_total = 0
        # sync-free bookkeeping on the device: [skipped total, skipped in a row now, longest run since the
        # last read, then per name in FLAG_NAMES how often it was non-finite since the last read]
        self._counts = torch.zeros(3 + len(FLAG_NAMES), dtype=torch.int64, device=device)
        self.shortfall = torch.zeros((), dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The counters, under the checkpoint's keys."""
        return {"nonfinite": {"total": self.nonfinite_total, "consecutive": self.nonfinite_consecutive},
                "scaler_overflows": self.scaler_overflows, "gmml_shortfall": self.gmml_shortfall_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters from a checkpoint (absent keys count 0), on the host and the device."""
        nonfinite = state.get("nonfinite", {})
        self.nonfinite_total = int(nonfinite.get("total", 0))
        self.nonfinite_consecutive = int(nonfinite.get("consecutive", 0))
        self.scaler_overflows = int(state.get("scaler_overflows", 0))
        self._counts.zero_()
        self._counts[0], self._counts[1] = self.nonfinite_total, self.nonfinite_consecutive
        self.gmml_shortfall_total = int(state.get("gmml_shortfall", 0))
        self.shortfall.fill_(self.gmml_shortfall_total)

    # ------------------------------------------------------------------ per step
    def flags(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per name in :data:`FLAG_NAMES`, 1.0 where that loss term / the gradient norm is NaN or Inf on any
        rank (0 for an absent one): float32 on the device (an all-reduce under DDP, queued like any other
        kernel: no host sync)."""
        zero = torch.zeros((), dtype=torch.bool, device=self.device)
        flags = torch.stack([~torch.isfinite(terms[k].float()) if k in terms else zero for k in FLAG_NAMES])
        flags = flags.to(torch.float32)
        if self.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def step_or_skip(self, result: StepResult, *, step: int, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, loss_fn: Any, pair: Any, momentum: float,
                     center_stats: Any) -> None:
        """Apply step ``step``'s updates (optimiser through ``scaler``, ``loss_fn``'s centres from
        ``center_stats``, ``pair``'s teacher EMA with ``momentum``), or skip them where ``result`` is
        non-finite. An fp16 loss-scale overflow skips the optimiser only (the authors' loop).

        Raises:
            NonFiniteLossError: host-checked, the run of steps without an update reached ``max_consecutive``.
        """
        if self.sync_free:
            self._step_or_skip_on_device(result.flags, optimizer, loss_fn, pair, momentum, center_stats)
        elif result.skipped and not result.scaler_overflow:
            self._skip_step(result, step, optimizer, scaler, pair.student)
        else:
            # an fp16 loss-scale overflow: the scaler skips the optimiser step and lowers the scale, and the teacher
            # and centres update from the finite outputs, as every step of the authors' (DINO) loop
            scaler.step(optimizer)
            scaler.update()
            loss_fn.update_centers_(center_stats)
            pair.update_teacher(momentum)
            if result.scaler_overflow:
                self._count_overflow(step, scaler.get_scale())
            else:
                self.nonfinite_consecutive = 0

    @torch.no_grad()
    def _step_or_skip_on_device(self, flags: torch.Tensor, optimizer: torch.optim.Optimizer, loss_fn: Any,
                                pair: Any, momentum: float, center_stats: Any) -> None:
        """The optimiser, centre and teacher updates, each a no-op where ``flags`` say the step is bad,
        decided on the device: fused AdamW skips on its ``found_inf`` flag (its step count is restored),
        the centres keep their old values through ``torch.where`` and the teacher's EMA momentum becomes 1.
        The skip counters stay on the device until :meth:`sync` reads them."""
        bad = flags.amax() > 0
        optimizer.found_inf = bad.to(torch.float32)
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
        old = (loss_fn.center_global.clone(), loss_fn.center_local.clone())
        loss_fn.update_centers_(center_stats)
        for center, before in zip((loss_fn.center_global, loss_fn.center_local), old, strict=True):
            center.copy_(torch.where(bad, before, center))
        pair.update_teacher(torch.where(bad, 1.0, momentum))
        c, b = self._counts, bad.to(torch.int64)
        run = (c[1] + 1) * b
        c[:3] = torch.stack([c[0] + b, run, torch.maximum(c[2], run)])
        c[3:] += flags.to(torch.int64)

    def _skip_step(self, result: StepResult, step: int, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, model: torch.nn.Module) -> None:
        bad_parts = _nonfinite_params(model) if "grad_norm" in result.nonfinite else []
        optimizer.zero_grad(set_to_none=True)
        scaler.update()  # fp16: an overflow lowers the loss scale; a no-op otherwise
        self.nonfinite_total += 1
        self.nonfinite_consecutive += 1
        what = ", ".join(result.nonfinite)
        if bad_parts:
            what += f" (gradients in {', '.join(bad_parts[:8])}{' ...' if len(bad_parts) > 8 else ''})"
        if self.is_main:
            log.warning("step %d: non-finite %s; step skipped (no optimiser, teacher or centre update), "
                        "%d in a row, %d in total", step, what, self.nonfinite_consecutive, self.nonfinite_total)
            self.events(step, {
                "event": "nonfinite_skip", "nonfinite": result.nonfinite, "nonfinite_params": bad_parts,
                "nonfinite_consecutive": self.nonfinite_consecutive, "nonfinite_total": self.nonfinite_total,
                **{k: float(v) for k, v in result.terms.items()}})
        self._stop_after_too_many(step, "had a non-finite loss or gradient norm", f"had non-finite {what}",
                                  "Try a lower optim.lr, train.precision=bf16/fp32, or check the data")

    def _count_overflow(self, step: int, scale: float) -> None:
        """After an fp16 loss-scale overflow: routine while the scaler finds its scale (an INFO line), but a long
        run of them means the gradients are non-finite at any scale, so they count towards ``max_consecutive``
        (not towards the non-finite skips' total)."""
        self.scaler_overflows += 1
        self.nonfinite_consecutive += 1
        if self.is_main:
            log.info("step %d: fp16 loss-scale overflow; optimiser step skipped, loss scale lowered to %g "
                     "(%d in a row)", step, scale, self.nonfinite_consecutive)
        self._stop_after_too_many(
            step, "without an optimiser update",
            f"overflowed the fp16 loss scale (each overflow halves it; now {scale:g}): the gradients stay non-finite",
            "Try a lower optim.lr or train.precision=bf16/fp32")

    def _stop_after_too_many(self, step: int, steps_were: str, last_was: str, advice: str) -> None:
        """Raise :class:`NonFiniteLossError` once ``nonfinite_consecutive`` reaches ``max_consecutive``
        (host-checked steps: skipped ones and fp16 overflows)."""
        limit = self.max_consecutive
        if self.nonfinite_consecutive >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_consecutive} consecutive steps {steps_were} (train.max_consecutive_nonfinite="
                f"{limit}); the last, step {step}, {last_was}. Stopping. {advice}; the last good "
                f"checkpoint is in {self.checkpoints}")

    # ------------------------------------------------------------------ at log steps
    def sync(self, step: int) -> None:
        """Sync-free: read the device-side counters (one host sync), report the steps skipped since the last
        read, and stop (:class:`NonFiniteLossError`) if a run of skipped steps reached ``max_consecutive``.
        Call at log intervals, epoch ends and checkpoints, with the steps done so far (a no-op when
        host-checked)."""
        if not self.sync_free:
            return
        total, consecutive, longest, *per_name, shortfall = torch.cat([self._counts, self.shortfall[None]]).tolist()
        if shortfall > self.gmml_shortfall_total and self.is_main:
            log.warning("GMML: %d sample(s) so far stayed below their corruption target: "
                        "gmml.candidate_budget=%d candidate blocks did not cover it; raise the budget",
                        shortfall, self.candidate_budget)
        self.gmml_shortfall_total = shortfall
        new = total - self.nonfinite_total
        self.nonfinite_total, self.nonfinite_consecutive = total, consecutive
        if new <= 0:
            return
        self._counts[2:] = 0
        names = [k for k, n in zip(FLAG_NAMES, per_name, strict=True) if n]
        what = ", ".join(f"{k} ({n} step{'s' if n > 1 else ''})" for k, n in zip(FLAG_NAMES, per_name,
                                                                                 strict=True) if n)
        if self.is_main:
            log.warning("up to step %d: %d step(s) skipped for a non-finite %s (no optimiser, teacher or centre "
                        "update); longest run %d, %d in a row now, %d in total", step, new, what, longest,
                        consecutive, total)
            self.events(step, {
                "event": "nonfinite_skip", "skipped_steps": new, "nonfinite": names, "longest_run": longest,
                "nonfinite_consecutive": consecutive, "nonfinite_total": total})
        limit = self.max_consecutive
        if longest >= limit:
            raise NonFiniteLossError(
                f"{longest} consecutive steps had a non-finite loss or gradient norm "
                f"(train.max_consecutive_nonfinite={limit}; checked sync-free, so noticed at step {step}); "
                f"non-finite: {what}. Stopping. Try a lower optim.lr, train.precision=fp32, or check the data; "
                f"the last good checkpoint is in {self.checkpoints}")


def _nonfinite_params(model: torch.nn.Module) -> list[str]:
    """Which parts of ``model`` (e.g. ``backbone.blocks.3``, ``head``) hold a NaN/Inf gradient.

    Only called on the skip path, so its per-parameter host syncs cost nothing in normal steps.
    """
    parts: list[str] = []
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            pieces = name.split(".")
            part = ".".join(pieces[:3] if pieces[1:2] == ["blocks"] else pieces[:1])
            if part not in parts:
                parts.append(part)
    return parts
