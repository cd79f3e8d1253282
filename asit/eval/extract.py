"""Embed every clip of a manifest with a frozen encoder; save / load the result as ``.npz``.

Undecodable clips are skipped and counted by reason (``unreadable``, ``empty``, ``non-finite``),
never silently: :class:`Embeddings` lists them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asit.atomic_io import atomic_write
from asit.data import AudioDecodeError, AudioEntry, load_audio
from asit.encoder import AudioEncoder

__all__ = ["Embeddings", "extract_embeddings", "load_embeddings", "save_embeddings"]

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Embeddings of the decodable clips of a manifest, in manifest order.

    Attributes:
        clip: ``[N, D]`` float32.
        paths: ``N`` file paths.
        labels: ``N`` tuples of string labels.
        frames: optional ``[N, T, D]`` float32 frame embeddings, zero-padded to the longest clip.
        num_frames: optional ``[N]`` valid frames per clip.
        timestamps_s: optional ``[T]`` frame centres in seconds.
        skipped: ``(path, reason)`` of each clip that could not be decoded.
    """

    clip: np.ndarray
    paths: list[str]
    labels: list[tuple[str, ...]]
    frames: np.ndarray | None = None
    num_frames: np.ndarray | None = None
    timestamps_s: np.ndarray | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.skipped))


def extract_embeddings(
    encoder: AudioEncoder,
    entries: Sequence[AudioEntry],
    *,
    batch_size: int = 16,
    with_frames: bool = False,
    progress: bool = True,
) -> Embeddings:
    """Decode and embed ``entries`` in batches of ``batch_size`` clips.

    Clips are decoded at the encoder's sample rate; clips that raise
    :class:`asit.data.AudioDecodeError` are skipped and recorded in ``Embeddings.skipped``.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    clips, frames, counts, paths, labels, skipped = [], [], [], [], [], []
    timestamps = None
    bar = tqdm(total=len(entries), desc="embedding", unit="clip", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(entries), batch_size):
        waves, kept = [], []
        for entry in entries[start : start + batch_size]:
            try:
                waves.append(load_audio(entry.path, encoder.sample_rate))
                kept.append(entry)
            except AudioDecodeError as err:
                log.warning("skipping %s", err)
                skipped.append((entry.path, err.reason))
        if waves:
            out = encoder.embed(waves, encoder.sample_rate)
            clips.append(out.clip.float().cpu().numpy())
            if with_frames:
                frames.append(out.frames.float().cpu().numpy())
                counts.append(out.num_frames.cpu().numpy())
                if timestamps is None or out.timestamps_s.numel() > timestamps.size:
                    timestamps = out.timestamps_s.cpu().numpy()
            paths += [e.path for e in kept]
            labels += [e.labels for e in kept]
        bar.update(len(entries[start : start + batch_size]))
        if skipped:
            bar.set_postfix(skipped=len(skipped))
    bar.close()
    if skipped:
        log.warning(
            "skipped %d of %d clips: %s", len(skipped), len(entries), dict(Counter(r for _, r in skipped))
        )
    if not clips:
        raise ValueError(f"none of the {len(entries)} clips could be decoded")
    result = Embeddings(clip=np.concatenate(clips), paths=paths, labels=labels, skipped=skipped)
    if with_frames:
        longest = max(f.shape[1] for f in frames)
        result.frames = np.concatenate(
            [np.pad(f, ((0, 0), (0, longest - f.shape[1]), (0, 0))) for f in frames]
        )
        result.num_frames = np.concatenate(counts)
        result.timestamps_s = timestamps
    return result


def _encode_labels(labels: list[tuple[str, ...]]) -> np.ndarray:
    # ";" separates several labels, as in the CSV manifests
    return np.array([";".join(x) for x in labels], dtype=str)


def save_embeddings(emb: Embeddings, path: str | os.PathLike) -> Path:
    """Write ``emb`` to a compressed ``.npz`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "clip": emb.clip.astype(np.float32),
        "paths": np.array(emb.paths, dtype=str),
        "labels": _encode_labels(emb.labels),
        "skipped_paths": np.array([p for p, _ in emb.skipped], dtype=str),
        "skipped_reasons": np.array([r for _, r in emb.skipped], dtype=str),
    }
    if emb.frames is not None:
        arrays.update(
            frames=emb.frames.astype(np.float32), num_frames=emb.num_frames, timestamps_s=emb.timestamps_s
        )
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
    return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read an ``.npz`` written by :func:`save_embeddings`."""
    with np.load(path, allow_pickle=False) as data:
        labels = [tuple(x for x in s.split(";") if x) for s in data["labels"].tolist()]
        emb = Embeddings(
            clip=data["clip"],
            paths=data["paths"].tolist(),
            labels=labels,
            skipped=list(zip(data["skipped_paths"].tolist(), data["skipped_reasons"].tolist())),
        )
        if "frames" in data:
            emb.frames, emb.num_frames, emb.timestamps_s = (
                data["frames"],
                data["num_frames"],
                data["timestamps_s"],
            )
    return emb
