"""The DALI pretraining loader: per-epoch rank shares of the clip inventory, run through DALI pipelines.

Each epoch :class:`DaliPretrainLoader` puts the clips in an order seeded by ``(seed, epoch)`` (the
same on every rank), gives each rank a contiguous share of the clips that passed the inventory's
checks (:mod:`asit.data.dali.clips`) and builds a pipeline (:mod:`asit.data.dali.pipeline`) over
this rank's share alone, so each epoch every clip is read once across ranks, ranks never read each
other's clips, and a resumed run places the stream without replaying earlier epochs
(``set_epoch(epoch, skip)``, the contract of :mod:`asit.data.samplers`). Every clip left out is
reported in ``num_skipped``/``skip_reasons``/``skipped_indices`` like the torch backend's collate
reports it, so the trainer's per-epoch summary and ``data.max_bad_fraction`` count it:

* a clip left out before training is reported in the batch where the epoch's order places it (on
  one rank), and the steps per epoch count only the kept clips;
* a clip whose header is fine but whose data DALI fails to decode mid-run is left out on the spot
  (DALI's error names it; when it names none, the clips the pipeline was reading are run one at a
  time through a synchronous copy of it to find the one that fails; if none does, the error is
  raised): the pipeline is rebuilt over this rank's clips not read yet, less that one, and the
  batch is drawn again (reason ``"undecodable"``, logged by name). Every epoch starts from the full
  list again, so such a clip is met (and reported) once per epoch, and each epoch's stream depends
  only on ``(seed, epoch)``: a resumed run replays it identically;
* clips that decode to NaN/Inf samples or samples beyond ``MAX_ABS_SAMPLE`` are dropped from their
  batch and reported in it (:func:`~asit.data.dali.clips.clip_check`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from ..audio import AudioDecodeError
from ..fbank import AUDIOSET_MEAN, AUDIOSET_STD, fbank_views
from ..manifest import AudioEntry
from ..samplers import check_skip, contiguous_share
from ..shards import ShardSet
from .clips import _FileClips, _ShardClips, clip_check

__all__ = ["DaliPretrainLoader"]

logger = logging.getLogger(__name__)


class DaliPretrainLoader:
    """Batches of pretraining views from a DALI pipeline, in :func:`~asit.data.dataset.collate_pretrain`'s layout.

    ``source`` is a manifest's entries (read with ``fn.readers.file``) or a
    :class:`~asit.data.shards.ShardSet` of WebDataset shards (read with ``fn.readers.webdataset``,
    see :class:`~asit.data.dali.clips._ShardClips`; labels from the ``json`` members, with the shards'
    label vocabulary unless ``label_vocab`` is given; ``index_dir`` is where its DALI index files go,
    default a temporary folder).

    Each batch: ``views`` float32 ``(B, V, 1, T, F)`` normalised, ``local_views``
    ``(B, L, 1, T_local, F)`` when ``local_views > 0``, ``label`` multi-hot ``(B, K)``,
    ``index`` int64 ``(B,)`` (manifest indices), ``num_skipped``, ``skip_reasons`` and
    ``skipped_indices`` (the clips of this batch's share that were left out, see the module
    docstring); the views on ``cuda:device_id`` (the CPU for ``device_id=None``), ``label`` and
    ``index`` on the CPU.

    Sharding: each epoch the clips are put in an order seeded by ``(seed, epoch)`` (the same on every
    rank: a permutation of the manifest; for shards, the tars permuted and each tar's clips permuted)
    and the clips that passed the check are cut into ``num_shards`` contiguous shares; each rank's
    pipeline reads only its own share, so ranks never read each other's clips. One pass of ``iter()``
    yields ``steps_per_epoch`` batches of the current epoch: by default the smallest share's clips //
    ``batch_size`` (the same on every rank, as DDP needs), capped by ``max_steps_per_epoch``; an
    explicit ``steps_per_epoch`` larger than that repeats the rank's own clips. :meth:`set_epoch`
    ``(epoch, skip)`` starts an epoch's pipeline and, for a resumed run, draws the first ``skip``
    samples of that epoch again.

    Clips that fail the check up front are left out and counted in :attr:`excluded`; they are also
    reported as skipped clips in the batch where the epoch's order places them (each on one rank),
    so the trainer's per-epoch summary and ``data.max_bad_fraction`` see them like the torch
    backend's. With a manifest, ``all_gather`` (``obj -> [obj of rank 0, obj of rank 1, ...]``, such
    as ``torch.distributed.all_gather_object``, called once by every rank) splits the header check:
    each rank reads every ``num_shards``-th header and the verdicts are exchanged; without it every
    rank reads them all. Other keyword arguments go to :func:`~asit.data.dali.build_dali_pipeline`.
    """

    def __init__(
        self,
        source: list[AudioEntry] | ShardSet,
        *,
        batch_size: int,
        sample_rate: int = 32000,
        num_mel_bins: int = 128,
        target_frames: int = 592,
        local_views: int = 0,
        local_target_frames: int = 192,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
        shard_id: int = 0,
        num_shards: int = 1,
        device_id: int | None = None,
        fbank: Literal["torch", "dali"] = "torch",
        steps_per_epoch: int | None = None,
        max_steps_per_epoch: int | None = None,
        label_vocab: list[str] | None = None,
        check_files: bool = True,
        index_dir: str | None = None,
        all_gather: Callable[[Any], list[Any]] | None = None,
        **pipeline_options: Any,
    ) -> None:
        if isinstance(source, ShardSet):
            if not source.urls:
                raise ValueError("shards lists no shard files")
            self._clips: _FileClips | _ShardClips = _ShardClips(source, label_vocab, index_dir)
        else:
            if not source:
                raise ValueError("entries is empty")
            self._clips = _FileClips(source, label_vocab)
            self.entries = self._clips.entries
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
        clips = self._clips
        self.headers_checked = 0  # audio headers this process read with soundfile (a manifest's files)
        if check_files and all_gather is not None and num_shards > 1 and isinstance(clips, _FileClips):
            # each process checks every num_shards-th header (at AudioSet scale a minute per process
            # warm, far more from cold storage), then the verdicts are exchanged: all ranks keep the same
            try:
                good, mine = clips.check(sample_rate, part=(shard_id, num_shards))
                error = None
            except Exception as exc:  # noqa: BLE001 (raised below on every rank, not here alone: no deadlock)
                good, mine, error = [], {}, f"{type(exc).__name__}: {exc}"
            self.headers_checked = len(good) + len(mine)
            parts = all_gather((mine, error))
            failed = [(rank, why) for rank, (_, why) in enumerate(parts) if why]
            if failed:
                raise RuntimeError("DALI loader: the header check failed on rank "
                                   + "; on rank ".join(f"{rank}: {why}" for rank, why in failed))
            self._left_out = dict(sorted(kv for part, _ in parts for kv in part.items()))
            keep = [i for i in range(len(clips)) if i not in self._left_out]
        elif check_files:
            keep, self._left_out = clips.check(sample_rate)
            if isinstance(clips, _FileClips):
                self.headers_checked = len(clips)
        elif isinstance(clips, _ShardClips):  # the tar members still (read from the headers already)
            keep, self._left_out = clips.check(sample_rate, formats=False)
        else:
            keep, self._left_out = list(range(len(clips))), {}
        self.excluded: Counter[str] = Counter(self._left_out.values())
        if self.excluded:
            logger.warning("DALI loader: left out %d clips that cannot be decoded: %s (e.g. %s)",
                           sum(self.excluded.values()), dict(self.excluded),
                           ", ".join(clips.name(i) for i in list(self._left_out)[:3]))
        if not keep:
            raise ValueError("no decodable clips")
        per_shard = len(keep) // num_shards  # the smallest share
        natural = per_shard // batch_size
        if natural == 0:
            raise ValueError(f"{len(keep)} decodable clips of {len(clips)} give {per_shard} per process for "
                             f"{num_shards} process(es): fewer than a batch of {batch_size}")
        self.batch_size = batch_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.sample_rate, self.num_mel_bins = sample_rate, num_mel_bins
        self.target_frames, self.local_target_frames = target_frames, local_target_frames
        self.mean, self.std = mean, std
        self.fbank = fbank
        self.local_views = local_views
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.keep = list(keep)
        self._seed = int(pipeline_options.pop("seed", 0))
        # the loader deals out the shards itself: each pipeline reads one rank's list, whole
        self._pipeline_args = dict(
            batch_size=batch_size, sample_rate=sample_rate, num_mel_bins=num_mel_bins, target_frames=target_frames,
            local_views=local_views, local_target_frames=local_target_frames, mean=mean, std=std,
            device_id=device_id, fbank=fbank, **pipeline_options)
        self._failed: set[int] = set()  # clips that failed to decode mid-run (in any epoch)
        self._pending: list[int] = []  # clips left out since the last batch, reported with the next
        self._warned: set[int] = set()  # clips whose skip was logged (once per clip)
        self.steps_per_epoch = steps_per_epoch or natural
        if max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)
        if self.steps_per_epoch > natural:
            logger.warning("DALI loader: %d steps of %d clips per epoch, but the smallest of the %d shares holds %d "
                           "decodable clips: clips come more than once per epoch (each rank its own)",
                           self.steps_per_epoch, batch_size, num_shards, per_shard)
        self.epoch = 0
        self.pipe = None  # built per epoch by set_epoch (or the first iter())

    def __len__(self) -> int:
        return self.steps_per_epoch

    def close(self) -> None:
        """Release the pipeline (and the DALI index files of a shard source)."""
        self.pipe = None
        self._clips.close()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start epoch ``epoch`` after its first ``skip`` samples (a multiple of the batch size).

        Every epoch has a pipeline of its own over an order of the clips seeded by
        ``(seed, epoch)``, so placing the stream costs at most the skipped batches of this epoch,
        never the earlier epochs."""
        skip = check_skip(skip, self.batch_size)
        self.epoch = int(epoch)
        self._plan_epoch()
        self._rebuilds = 0  # pipelines of this epoch rebuilt after a failure
        self._step = 0  # batches drawn in this epoch
        self._start_pipeline()
        while self._step < skip // self.batch_size:
            self._run()
            self._step += 1
        self._pending = []  # failures met while replaying were reported when the stream first passed them

    def _plan_epoch(self) -> None:
        """This rank's clips for the epoch, and the step at which each left-out clip is reported.

        The epoch's order covers every clip; the kept ones are cut into ``num_shards`` contiguous shares
        and a left-out clip belongs to the batch of the kept clip that follows it (the last one at the
        end), so over the ranks each is reported once, in proportion to the clips the epoch reads."""
        kept: list[int] = []
        owner: list[tuple[int, int]] = []  # (left-out clip, position in the kept order of its batch)
        for i in self._clips.order(self._seed, self.epoch):
            if i in self._left_out:
                owner.append((i, len(kept)))
            else:
                kept.append(i)
        start, stop = contiguous_share(len(kept), self.shard_id, self.num_shards)
        self._shard = kept[start:stop]  # this epoch's clips, less those that fail in it
        self._left_out_at: dict[int, list[int]] = {}
        for i, k in owner:
            k = min(k, len(kept) - 1)
            if start <= k < stop:
                self._left_out_at.setdefault((k - start) // self.batch_size, []).append(i)

    def _start_pipeline(self) -> None:
        """A pipeline over this rank's clips from the current position on (after a rebuild: those not
        read yet); when they run out, the reader wraps around them, never into another rank's."""
        self._files = self._shard[self._step * self.batch_size :] or self._shard
        self._pipe_batches = 0  # batches this pipeline has returned
        # the crops' seed is per shard, or every rank would draw the same crop offsets for its i-th clip
        seed = int(np.random.default_rng([self._seed, self.epoch, self._rebuilds, 1, self.shard_id]).integers(2**31))
        self.pipe = None  # release the old pipeline first
        self.pipe = self._clips.build(self._files, seed=seed, **self._pipeline_args)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.pipe is None:
            self.set_epoch(self.epoch)
        while self._step < self.steps_per_epoch:
            outputs = self._run()
            batch = self._batch(outputs, self._step)
            self._step += 1
            yield batch
        self.pipe, self.epoch = None, self.epoch + 1  # a further iter() without set_epoch: the next epoch

    def _run(self):
        """One batch from the pipeline with the clips it holds; a clip DALI fails to decode is left out and
        the pipeline rebuilt."""
        while True:
            try:
                outputs = self.pipe.run()
                first = self._pipe_batches * self.batch_size
                clips = [self._files[p % len(self._files)] for p in range(first, first + self.batch_size)]
                self._pipe_batches += 1
                return outputs, clips
            except RuntimeError as err:
                bad = self._culprit(str(err))
                found = "named in DALI's error"
                if bad is None:  # DALI's error names no file (e.g. "unimplemented format"): find the clip
                    bad, found = self._probe(), "found by decoding the clips one at a time"
                if bad is None:
                    raise RuntimeError(f"DALI pipeline failed on shard {self.shard_id} in epoch {self.epoch + 1}, "
                                       "and no clip it was reading fails alone: " + _first_line(str(err))) from err
                self._shard.remove(bad)
                self._pending.append(bad)
                if bad not in self._failed:
                    self._failed.add(bad)
                    self.excluded["undecodable"] += 1
                self._rebuilds += 1
                logger.warning("DALI loader: %s cannot be decoded (%s; %s); left out of epoch %d, its pipeline "
                               "rebuilt over this rank's remaining clips", self._clips.name(bad),
                               _first_line(str(err)), found, self.epoch + 1)
                if not self._shard:
                    raise ValueError(f"no decodable clips left on shard {self.shard_id}") from err
                self._start_pipeline()

    def _probe(self) -> int | None:
        """The first clip the failed pipeline was reading (its current batch and those it prefetched)
        that fails alone, run through the same stages in a synchronous pipeline of batches of one."""
        ahead = self._pipeline_args.get("prefetch", 2) + 2  # batches the pipeline may have started
        start = self._pipe_batches * self.batch_size
        candidates = list(dict.fromkeys(self._files[p % len(self._files)]
                                        for p in range(start, start + ahead * self.batch_size)))
        args = {**self._pipeline_args, "batch_size": 1, "num_threads": 1}
        probe = self._clips.build(candidates, seed=0, synchronous=True, **args)
        for i in candidates:
            try:
                probe.run()
            except RuntimeError:
                return i
        return None

    def _culprit(self, message: str) -> int | None:
        """The clip of this rank a DALI error message names (the audio decoder says ``Error decoding file <path>``)."""
        match = re.search(r"Error decoding (?:audio )?file (.+?)\.(?: |$)", message, re.MULTILINE)
        if match:
            named = match.group(1)
            for i in self._shard:
                if self._clips.source(i) == named:
                    return i
        named_in = [i for i in self._shard if self._clips.source(i) in message]
        return max(named_in, key=lambda i: len(self._clips.source(i))) if named_in else None

    def _tensor(self, tensor_list) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.from_numpy(np.array(tensor_list.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _views(self, data: torch.Tensor, frames: int) -> torch.Tensor:
        """Pipeline output ``(B, V, ...)`` → normalised fbanks ``(B, V, 1, T, F)``."""
        if self.fbank == "dali":
            return data.unsqueeze(2)
        return fbank_views(data, self.sample_rate, self.num_mel_bins, frames, self.mean, self.std)

    def _batch(self, run: tuple[Any, list[int]], step: int) -> dict[str, Any]:
        """A batch in :func:`~asit.data.dataset.collate_pretrain`'s layout from the pipeline's outputs.

        Clips whose decoded samples :func:`~asit.data.audio.load_audio` would refuse (NaN/Inf:
        ``"non-finite"``, beyond ±``MAX_ABS_SAMPLE``: ``"out-of-range"``) are dropped and reported in
        ``skip_reasons``/``skipped_indices``, like the torch backend's collate does (and, from shards,
        clips whose ``json`` member does not parse: ``"bad-metadata"``). On the CPU the views
        themselves are checked as well (the torch backend's last guard); on a GPU that check would wait
        for the queued training step, and finite samples within the range give finite views anyway.
        """
        outputs, clips = run
        index, labels, reasons = self._clips.rows(outputs[0], clips)  # [B], [B, K], {row: (reason, detail)}
        stats = np.array(outputs[1].as_tensor()).reshape(-1, 4)  # [B, 4]: min, max, sum, samples
        rows = {"views": self._tensor(outputs[2])}
        if self.local_views > 0:
            rows["local_views"] = self._tensor(outputs[3])
        for row, clip_stats in enumerate(stats):
            if row not in reasons:
                why = clip_check(*clip_stats)
                if why is not None:
                    reasons[row] = why
        dropped = {}  # clip -> (reason, detail)
        if reasons:  # rows picked by a host index: no wait for the device
            keep = torch.tensor([r for r in range(len(index)) if r not in reasons], dtype=torch.int64)
            dropped = {clips[row]: why for row, why in reasons.items()}
            rows = {k: v[keep.to(v.device)] for k, v in rows.items()}
            index, labels, clips = index[keep], labels[keep], [clips[r] for r in keep.tolist()]
        views = {"views": self._views(rows["views"], self.target_frames)}
        if self.local_views > 0:
            views["local_views"] = self._views(rows["local_views"], self.local_target_frames)
        if self.device.type == "cpu":  # a sum is NaN/Inf when any element is (see ClipViews.make_sample)
            finite = torch.ones(len(index), dtype=torch.bool)
            for v in views.values():
                finite &= torch.isfinite(v.flatten(1).sum(1))
            if not finite.all():
                dropped.update({clips[r]: ("non-finite", "non-finite fbank") for r in (~finite).nonzero().flatten()})
                views = {k: v[finite] for k, v in views.items()}
                index, labels = index[finite], labels[finite]
        for clip, (reason, detail) in dropped.items():
            if clip not in self._warned:
                self._warned.add(clip)
                logger.warning("DALI loader: skipping clip %d: %s", self._clips.index(clip),
                               AudioDecodeError(self._clips.name(clip), reason, detail))
        skipped = [(i, self._left_out[i]) for i in self._left_out_at.get(step, [])]
        skipped += [(i, "undecodable") for i in self._pending] + [(i, r) for i, (r, _) in dropped.items()]
        self._pending = []
        return {
            **views,
            # on the host, like the torch loader's: copying it to the GPU here (pageable memory) would wait
            # for the GPU queue before every step; pretraining does not use it
            "label": labels,
            "index": index,
            "num_skipped": len(skipped),
            "skip_reasons": [r for _, r in skipped],
            "skipped_indices": [self._clips.index(i) for i, _ in skipped],
        }


def _first_line(message: str) -> str:
    """The line of a DALI error that says what failed (DALI wraps it in several lines of context)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for k, line in enumerate(lines):
        if "Error decoding" in line:
            return line[:300]
        if line == "encountered:" and k + 1 < len(lines):  # what the failing operator reported
            return lines[k + 1][:300]
    return lines[-1][:300] if lines else "no message"
