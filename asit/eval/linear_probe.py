"""Linear probing of a frozen encoder: k-fold stratified cross-validation of a logistic regression.

The encoder never changes, so each clip is embedded once and the embeddings are cached (an
``.npz`` keyed by the encoder file's hash, the manifest's entries with each audio file's size and
modification time, and the embedding options).
The probe itself, its metrics and folds (:func:`cross_validate`, :func:`fit_linear`,
:func:`stratified_folds`, :func:`accuracy`, :func:`average_precision`, :func:`mean_average_precision`,
:class:`ProbeConfig`) live in :mod:`asit.train.probes`, where the pretraining monitor uses them too;
they are importable from here as before. For each fold the features are standardised with the
training part's statistics and a linear layer is fitted full-batch with L-BFGS (softmax
cross-entropy for single-label data, per-class sigmoid for multi-label data) plus an L2 penalty.
Single-label tasks report accuracy, multi-label tasks mean average precision (mAP over the classes
present in the test fold).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from asit.data import load_manifest
from asit.encoder import load_encoder
from asit.train.probes import (
    ProbeConfig,
    accuracy,
    average_precision,
    cross_validate,
    fit_linear,
    mean_average_precision,
    stratified_folds,
)

from .extract import Embeddings, extract_embeddings, load_embeddings, save_embeddings

__all__ = [
    "ProbeConfig",
    "accuracy",
    "average_precision",
    "cached_embeddings",
    "cross_validate",
    "fit_linear",
    "mean_average_precision",
    "probe_encoder",
    "stratified_folds",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- encoder + manifest → results


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_stamp(path: str) -> tuple[int, int] | tuple[None, None]:
    """``(size, mtime_ns)`` of a file; ``(None, None)`` when it cannot be read (it is skipped later)."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def cached_embeddings(
    encoder_path: str | os.PathLike,
    manifest: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike,
    random_init: bool = False,
    seed: int = 0,
    pool: str = "cls",
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Embeddings, Path]:
    """Clip embeddings of ``manifest`` by the encoder, computed once and cached in ``cache_dir``.

    The cache key covers the encoder file's SHA-256, the manifest's entries (paths, labels, and
    each audio file's size and modification time in ns, so rewritten audio is embedded again),
    ``random_init`` / ``seed`` and ``pool``; anything else changing gives a new file.
    """
    entries = load_manifest(manifest)
    key = {
        "encoder": file_sha256(encoder_path),
        "entries": [[e.path, list(e.labels), *_file_stamp(e.path)] for e in entries],
        "random_init": random_init,
        "seed": seed if random_init else None,
        "pool": pool,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"emb_{digest}.npz"
    if path.is_file():
        log.info("using cached embeddings %s", path)
        return load_embeddings(path), path
    encoder = load_encoder(encoder_path, device=device, random_init=random_init, seed=seed, pool=pool)  # type: ignore[arg-type]
    emb = extract_embeddings(encoder, entries, batch_size=batch_size, progress=progress)
    save_embeddings(emb, path)
    return emb, path


def probe_encoder(
    encoder_path: str | os.PathLike,
    manifest: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike,
    cfg: ProbeConfig | None = None,
    random_init: bool = False,
    init_seed: int = 0,
    pool: str = "cls",
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``manifest`` with the frozen encoder (cached) and cross-validate a linear probe.

    Returns the :func:`cross_validate` results plus the encoder, manifest, embedding options,
    clip count and skipped clips.
    """
    cfg = cfg or ProbeConfig()
    emb, cache = cached_embeddings(
        encoder_path,
        manifest,
        cache_dir=cache_dir,
        random_init=random_init,
        seed=init_seed,
        pool=pool,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    result = cross_validate(emb.clip, emb.labels, cfg)
    result.update(
        encoder=os.fspath(encoder_path),
        manifest=os.fspath(manifest),
        random_init=random_init,
        init_seed=init_seed if random_init else None,
        pool=pool,
        num_clips=len(emb.paths),
        embed_dim=int(emb.clip.shape[1]),
        skipped=emb.skipped_counts(),
        embeddings=str(cache),
    )
    return result
