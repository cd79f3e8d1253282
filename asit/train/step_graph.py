"""The whole training step as one CUDA graph (``train.cuda_graph``).

:class:`StepGraph` runs the sync-free step of a :class:`~asit.train.engine.Pretrainer` in a *graph-ready*
form: every per-step number lives on the device and nothing is read back, so the same Python code can run
eagerly or be captured once with :class:`torch.cuda.CUDAGraph` and replayed. What changes against the
eager sync-free step:

- The schedules (learning rate, weight decay, teacher momentum, teacher temperature) are tensors on the
  device, indexed by a device step counter that the step advances itself; the host refills the counter only
  when it moved without a step (an unusable batch).
- AdamW reads its learning rate from a 0-d tensor, and its decoupled weight decay is applied by the step
  (``p *= 1 - lr·wd``, a tensor, 1 on a skipped step) with the groups' ``weight_decay`` set to 0, because
  the fused kernel takes the decay as a host number only.
- GMML draws from the trainer's generator, registered with the graph, so each replay draws fresh numbers
  from the generator's current offset: the same masks, in the same order, as the eager step draws.
- The first ``warmup_steps`` steps (and as many again when the frozen last layer starts training: a second
  graph) run eagerly on a side stream; the next one is captured on it and every later one replays it. The
  default generator (drop path) is registered with the graph by the capture itself.
- The batch (its views, or with ``data.fbank_on=device`` its waveform crops: the fbank is then part of the
  graph) is copied into static buffers before each replay, from the host through staging buffers on a side
  stream (the transfer overlaps the previous replay); a batch of another shape (clips dropped as unusable)
  runs the same step eagerly, into the captured gradient tensors (zeroed in place, not freed), so ``p.grad``
  stays the tensors the graph writes and its optimiser reads. The loss terms and flags come back as one packed
  tensor, cloned after a replay, so a :class:`~.guard.StepResult` stays valid after the next replay.

On the CPU the hyperparameter tensors are float64, which the CPU kernels read exactly as they read a Python
number, so the graph-ready step equals the eager sync-free step bit for bit (``tests/test_train_step_graph.py``);
on CUDA they are float32 (what fused AdamW's tensor learning rate and the Triton loss read), so the two
differ by the rounding of the learning rate and of the weight decay's formula.

Capture needs CUDA, ``train.mode=fast``, the sync-free step, bf16 or fp32, and one process: DDP's gradient
all-reduce would have to be captured too (NCCL inside a graph, static buckets), which is not done here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from asit.data.ring import resolve_ring_refs

from .guard import StepResult
from .loaders import batch_views
from .metrics import collapse_monitors
from .optim import clip_gradients

__all__ = ["StepGraph"]

log = logging.getLogger(__name__)

_INPUTS = ("views", "local_views", "waves", "local_waves")  # what the step reads from a batch (static buffers)
_WARMUP_STEPS = 2  # eager steps before a capture: kernels compiled and tuned, optimiser state created


class StepGraph:
    """The graph-ready step of ``trainer``, captured as a CUDA graph when ``capture``.

    Args:
        trainer: a set-up :class:`~asit.train.engine.Pretrainer` running sync-free on one process.
        capture: capture and replay (needs CUDA); False runs the graph-ready step eagerly (the CPU tests).
        warmup_steps: eager steps (on a side stream) before each capture.

    Raises:
        ValueError: the trainer cannot run this step (the message names the config key).
    """

    def __init__(self, trainer: Any, *, capture: bool = True, warmup_steps: int = _WARMUP_STEPS) -> None:
        t = trainer.cfg.train
        device = trainer.device
        self.capture = bool(capture)
        problems = [
            (self.capture and device.type != "cuda", f"needs a CUDA device (this run's device is {device.type})"),
            (t.mode != "fast", f"needs train.mode=fast, not {t.mode}"),
            (not trainer.sync_free, "needs the sync-free step (train.sync_free=true; it is off here)"),
            (trainer.precision not in ("bf16", "fp32"), f"needs train.precision bf16 or fp32, not {trainer.precision}"),
            (trainer.dist.world_size > 1,
             f"runs on one process: DDP's gradient all-reduce cannot be captured here (NCCL inside a graph, static "
             f"buckets); this run has {trainer.dist.world_size} processes, so set train.cuda_graph=false"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"train.cuda_graph=true {message}")
        self.trainer, self.device, self.warmup_steps = trainer, device, warmup_steps
        # float64 on the CPU: its kernels read a 0-d tensor as they read a Python number (bitwise the eager
        # step); float32 on CUDA: fused AdamW's tensor learning rate and the Triton loss read float32
        self.hp_dtype = torch.float64 if device.type == "cpu" else torch.float32
        scheds = np.stack([trainer.lr_sched, trainer.wd_sched, trainer.momentum_sched, trainer.temp_sched])
        self.schedules = torch.as_tensor(scheds, dtype=torch.float64).to(device)  # [4, total steps]
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)
        self._device_step: int | None = None  # what the host knows step_t holds
        self.lr = torch.zeros((), dtype=self.hp_dtype, device=device)
        decay = []
        for group in trainer.optimizer.param_groups:
            group["lr"] = self.lr
            group["capturable"] = True  # fused AdamW's state lives on the device anyway
            if group["apply_wd"]:
                group["weight_decay"] = 0.0  # applied by the step, from a tensor
                decay += group["params"]
        self.decay_params = decay
        self.params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        self.grads: list[torch.Tensor | None] | None = None  # the captured graph's p.grad, per self.params
        # the warm-up steps run uncaptured on purpose: no "capturable=True outside a capture" warning for them
        trainer.optimizer._warned_capturable_if_run_uncaptured = True
        self.stream = torch.cuda.Stream(device) if self.capture else None  # warm-up and capture
        self.copy_stream = torch.cuda.Stream(device) if self.capture else None  # host batches into staging buffers
        self.staging: dict[str, torch.Tensor] = {}
        self._staging_free: torch.cuda.Event | None = None  # the last staging → static copy is done
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: dict[str, Any] | None = None  # the captured step's outputs (static: rewritten by each replay)
        self.key: bool | None = None  # the captured step's "last layer frozen"
        self.warm = 0  # eager steps done for this key
        self.shapes: tuple | None = None  # the batch shapes the graph is captured for (the first batch's)
        self.static: dict[str, torch.Tensor] | None = None  # the graph's input buffers
        self.replays = self.captures = 0
        self.last: dict[str, Any] | None = None  # the last step's outputs (for tests)

    # ------------------------------------------------------------------ the step
    def step(self, batch: dict[str, Any], epoch: int, *, monitors: bool = False, preview: bool = False) -> StepResult:
        """One optimisation step on a collated batch, as :meth:`Pretrainer.train_step` (same arguments and
        result): eager for the warm-up steps and for a batch of another shape, a graph replay otherwise."""
        tr = self.trainer
        batch = resolve_ring_refs(batch)
        inputs = {k: batch[k] for k in _INPUTS if isinstance(batch.get(k), torch.Tensor) and batch[k].numel() > 0}
        frozen = epoch < tr.cfg.optim.freeze_last_layer_epochs
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        if self.shapes is None:
            self.shapes = shapes
        if self._device_step != tr.step:  # a step skipped on the host (unusable batch), a resume, the start
            self.step_t.fill_(tr.step)
        if self.capture and self.key != frozen:  # the frozen last layer ends: a new graph
            self.graph, self.out, self.key, self.warm, self.grads = None, None, frozen, 0, None
        if not self.capture or shapes != self.shapes or self.warm < self.warmup_steps:
            out = self._eager(inputs, frozen)
            self.warm += shapes == self.shapes
            packed = out["packed"]
        else:
            if self.graph is None:
                self._capture(inputs, frozen)
            self._fill(inputs)
            self.graph.replay()
            self.replays += 1
            out = self.out
            packed = out["packed"].clone()  # the result outlives the next replay
        self._device_step = tr.step + 1
        self.last = out
        names = out["names"]
        result = StepResult({k: packed[i] for i, k in enumerate(names)}, flags=packed[len(names):])
        if monitors:  # with the centres this step used
            result.monitors = collapse_monitors(out["teacher_out"], *out["centres"], out["temp"])
        if preview:
            n = min(4, out["clean"].shape[0])
            tr._preview = (result, *(x[:n].detach().float().clone()
                                     for x in (out["clean"], out["corrupted"], out["recon"], out["mask"])))
        i = min(tr.step, tr.total_steps - 1)
        tr._hp = {"lr": float(tr.lr_sched[i]), "wd": float(tr.wd_sched[i]),
                  "momentum": float(tr.momentum_sched[i]), "teacher_temp": float(tr.temp_sched[i])}
        tr.step += 1
        return result

    def _fill(self, inputs: dict[str, torch.Tensor]) -> None:
        """Copy this batch into the graph's input buffers. A batch in (pinned) host memory goes to staging
        buffers on a side stream first, so its transfer overlaps the previous replay, which still reads the
        input buffers; one device copy then moves it in, ordered before this replay."""
        on_host = [k for k, v in inputs.items() if v.device.type == "cpu"]
        if self.copy_stream is None or not on_host:
            for k, buffer in self.static.items():
                buffer.copy_(inputs[k], non_blocking=True)
            return
        current = torch.cuda.current_stream(self.device)
        for k in on_host:
            if k not in self.staging:
                self.staging[k] = torch.empty_like(self.static[k])
        with torch.cuda.stream(self.copy_stream):
            if self._staging_free is not None:  # the previous batch has left the staging buffers
                self.copy_stream.wait_event(self._staging_free)
            for k in on_host:
                self.staging[k].copy_(inputs[k], non_blocking=True)
        current.wait_stream(self.copy_stream)
        for k, buffer in self.static.items():
            buffer.copy_(self.staging[k] if k in on_host else inputs[k], non_blocking=True)
        self._staging_free = current.record_event()

    def _eager(self, inputs: dict[str, torch.Tensor], frozen: bool) -> dict[str, Any]:
        """The graph-ready step run eagerly (on the side stream when capturing later)."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        if self.stream is None:
            return self._body(inputs, frozen)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        for x in inputs.values():
            x.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            out = self._body(inputs, frozen)
        current.wait_stream(self.stream)
        return out

    def _capture(self, inputs: dict[str, torch.Tensor], frozen: bool) -> None:
        """Capture the step on the side stream into a new graph, with static input buffers holding this batch."""
        tr = self.trainer
        self.static = {k: v.to(self.device).clone() for k, v in inputs.items()}
        tr.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients from the graph's pool
        self.graph, self.out = self._record(frozen)
        self.grads = [p.grad for p in self.params]  # allocated by the capture: what each replay writes
        self.captures += 1
        log.info("train.cuda_graph: step %d captured as a CUDA graph (last layer %s)", tr.step + 1,
                 "frozen" if frozen else "trained")

    def _record(self, frozen: bool) -> tuple[Any, dict[str, Any]]:
        """Capture :meth:`_body` on the static buffers: the graph and its (static) outputs. Nothing runs."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.trainer.gmml_gen)  # each replay draws from its current offset
        # thread_local: the loader's pin-memory thread may allocate while the step is being captured
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            out = self._body(self.static, frozen)
        return graph, out

    def _body(self, inputs: dict[str, torch.Tensor], frozen: bool) -> dict[str, Any]:
        """The sync-free step with device hyperparameters, from the batch's tensors on the device (with
        ``data.fbank_on=device`` the fbank is part of it): no host read, no Python decision on a value."""
        tr = self.trainer
        batch = batch_views(inputs, tr.cfg.data, self.device)  # waveform crops → views
        views, local = batch["views"], batch.get("local_views")
        opt = tr.cfg.optim
        i = self.step_t.clamp(max=tr.total_steps - 1).reshape(1)
        lr, wd, momentum, temp = self.schedules.index_select(1, i).reshape(4).unbind(0)  # float64
        self.lr.copy_(lr)
        temp = temp.to(self.hp_dtype)
        momentum = momentum.to(torch.float32)  # as torch.where(bad, 1.0, m) makes it in the eager step
        local_views = None if local is None else local.transpose(0, 1).flatten(0, 1)  # [L·B, 1, T', F]
        with record_function("asit.gmml"):
            clean, corrupted, mask, frac = tr._corrupt(views)
        student_out, teacher_out, losses, center_stats = tr._forward_losses(clean, corrupted, mask, frac,
                                                                            local_views, temp)
        if self.grads is None:  # in a capture, backward then allocates the gradients from the graph's pool
            tr.optimizer.zero_grad(set_to_none=True)
        else:  # an eager step beside a captured graph: into the gradients the graph writes and its optimiser reads
            for p, g in zip(self.params, self.grads, strict=True):
                p.grad = g
            tr.optimizer.zero_grad(set_to_none=False)  # backward adds its gradients to 0: equal values
        with record_function("asit.backward"):
            losses["loss"].backward()
        with record_function("asit.clip"):
            grad_norm = clip_gradients(tr.student, opt.clip_grad, opt.clip_mode)
        terms = tr._step_terms(losses, grad_norm, frozen=frozen)
        flags = tr.guard.flags(terms)
        centres = (tr.loss_fn.center_global.clone(), tr.loss_fn.center_local.clone())
        with record_function("asit.update"):
            with torch.no_grad():
                decay = [p for p in self.decay_params if p.grad is not None]
                if decay:  # AdamW's decoupled decay p·(1 - lr·wd), computed as the CPU kernel does; 1 if skipped
                    factor = torch.where(flags.amax() > 0, 1.0, 1.0 - lr * wd).to(torch.float32)
                    torch._foreach_mul_(decay, factor)
            tr.guard.step_or_skip(StepResult(terms, flags=flags), step=tr.step + 1, optimizer=tr.optimizer,
                                  scaler=tr.scaler, loss_fn=tr.loss_fn, pair=tr.pair, momentum=momentum,
                                  center_stats=center_stats)
        self.step_t += 1
        names = list(terms)
        packed = torch.cat([torch.stack([terms[k].float() for k in names]), flags])
        return {"packed": packed, "names": names, "teacher_out": teacher_out, "centres": centres, "temp": temp,
                "clean": clean, "corrupted": corrupted, "recon": student_out["recon"], "mask": mask}
