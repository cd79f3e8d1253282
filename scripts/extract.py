#!/usr/bin/env python
"""Embed every clip of a manifest with a frozen ASiT encoder and save the result as .npz.

    python scripts/extract.py --encoder runs/demo_cpu/teacher_encoder.safetensors \\
        --manifest data/esc50.csv [--out emb.npz] [--frames] [--batch-size 16]

Without --out the file is ``embeddings.npz`` next to the encoder (never the current folder).

The .npz holds ``clip`` [N, D], ``paths``, ``labels`` (";"-joined), the skipped clips and, with
--frames, ``frames`` [N, T, D], ``num_frames`` [N] and ``timestamps_s`` [T]. Undecodable files
are skipped, counted and reported; the exit status is 0 unless nothing could be embedded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asit import cli
from asit.data import ManifestError, load_manifest
from asit.encoder import EncoderError, load_encoder
from asit.eval.extract import extract_embeddings, save_embeddings


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", required=True, help="teacher_encoder.safetensors from pretraining")
    parser.add_argument("--manifest", required=True, help="JSON/CSV manifest or a folder of audio files")
    parser.add_argument("--out", default=None, help="output .npz (default: embeddings.npz next to the encoder)")
    parser.add_argument("--frames", action="store_true", help="also store per-frame (160 ms) embeddings")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per batch (default 16)")
    parser.add_argument(
        "--pool",
        choices=("cls", "tokens"),
        default="cls",
        help="clip embedding: mean [CLS] over windows (default) or mean of all tokens",
    )
    parser.add_argument(
        "--hop-frames",
        type=int,
        default=None,
        help="window hop in fbank frames, a multiple of the patch size (default: no overlap)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cli.setup_logging()
    with cli.usage_errors(parser, ManifestError, EncoderError, ValueError):
        entries = load_manifest(args.manifest)
        encoder = load_encoder(args.encoder, device=args.device, hop_frames=args.hop_frames, pool=args.pool)
    with cli.user_errors(ValueError):
        emb = extract_embeddings(
            encoder,
            entries,
            batch_size=args.batch_size,
            with_frames=args.frames,
            progress=not args.no_progress,
        )
    path = save_embeddings(emb, args.out or Path(args.encoder).parent / "embeddings.npz")
    skipped = f"; skipped {len(emb.skipped)} undecodable: {emb.skipped_counts()}" if emb.skipped else ""
    print(f"wrote {len(emb.paths)} embeddings of dim {emb.clip.shape[1]} to {path}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
