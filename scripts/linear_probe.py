#!/usr/bin/env python
"""Linear probe of a frozen ASiT encoder: k-fold stratified cross-validation on a labelled manifest.

    python scripts/linear_probe.py --encoder runs/demo_cpu/teacher_encoder.safetensors \\
        --manifest data/esc50.csv [--out probe.json] [--folds 5] [--random-init]

Without --out the results are ``probe.json`` (``probe_random_init.json`` with --random-init) next to
the encoder, never in the current folder.

Embeddings are computed once and cached in --cache-dir (keyed by the encoder file's hash, the
manifest's entries, each audio file's size and modification time, and the options).
Single-label manifests report accuracy, multi-label ones mAP, per fold and as mean ± std.
--random-init probes the same architecture with random weights, the baseline to compare against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asit import cli
from asit.data import ManifestError
from asit.encoder import EncoderError
from asit.eval.linear_probe import ProbeConfig, probe_encoder


def default_probe_path(encoder: str, *, random_init: bool) -> Path:
    """Where the results go without ``--out``: beside the encoder file."""
    return Path(encoder).parent / ("probe_random_init.json" if random_init else "probe.json")


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", required=True, help="teacher_encoder.safetensors from pretraining")
    parser.add_argument(
        "--manifest", required=True, help="labelled JSON/CSV manifest or folder of class folders"
    )
    parser.add_argument("--out", default=None,
                        help="results .json (default: probe.json or probe_random_init.json next to the encoder)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    parser.add_argument("--weight-decay", type=float, default=ProbeConfig.weight_decay)
    parser.add_argument("--max-iter", type=int, default=ProbeConfig.max_iter, help="L-BFGS iterations")
    parser.add_argument(
        "--random-init", action="store_true", help="probe randomly initialised weights instead"
    )
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--pool", choices=("cls", "tokens"), default="cls")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: next to --out)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cli.setup_logging()
    out = Path(args.out) if args.out else default_probe_path(args.encoder, random_init=args.random_init)
    cfg = ProbeConfig(
        folds=args.folds, seed=args.seed, weight_decay=args.weight_decay, max_iter=args.max_iter
    )
    with cli.user_errors(ManifestError, EncoderError, ValueError):
        result = probe_encoder(
            args.encoder,
            args.manifest,
            cache_dir=args.cache_dir or out.parent / "embeddings",
            cfg=cfg,
            random_init=args.random_init,
            init_seed=args.init_seed,
            pool=args.pool,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"{result['metric']}: {result['mean']:.4f} ± {result['std']:.4f} over {cfg.folds} folds "
        f"({result['num_clips']} clips, {len(result['classes'])} classes) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
