#!/usr/bin/env python
"""Fbank mean and standard deviation of a corpus, for ``data.mean``/``data.std``.

    python scripts/compute_stats.py /data/my_corpus.json                     # all clips, 32 kHz
    python scripts/compute_stats.py /data/wavs --max-clips 20000 --num-workers 8 -o stats.yaml
    python scripts/compute_stats.py manifest.csv --config asit_v2_vit_base    # that recipe's rate/bins

The manifest is a JSON/CSV manifest or a folder of audio files (see asit.data.load_manifest).
Compute the statistics at the sample rate and mel bins you train with (``--config`` takes them from
the recipe). The result is printed as overrides to add to the training command:

    torchrun ... scripts/pretrain.py --config asit_v2_vit_base data.mean=-5.1234567 data.std=4.3210987

With ``-o`` the same values are also written as a YAML fragment (``data: {mean: ..., std: ...}``), for
your records or to copy into your own recipe file. It is not a recipe: ``--config stats.yaml`` would
train with the defaults for every other key (the demo data, 32 kHz, ...), not with your recipe.
Undecodable clips are skipped; each is named on stderr with its reason (``# skipped path: reason``), then
the counts per reason. A progress bar shows the clips done.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from asit import cli
from asit.config import ConfigError, available_recipes, load_config
from asit.data import ManifestError, load_manifest
from asit.data.stats import compute_fbank_stats


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", help="JSON/CSV manifest or folder of audio files")
    parser.add_argument("--config", default=None,
                        help=f"recipe ({', '.join(available_recipes())}) or YAML file whose data.sample_rate "
                             "and data.num_mel_bins to use (default: 32000 Hz, 128 bins)")
    parser.add_argument("--sample-rate", type=int, default=None, help="override the sample rate (Hz)")
    parser.add_argument("--num-mel-bins", type=int, default=None, help="override the number of mel bins")
    parser.add_argument("--max-clips", type=int, default=None, help="use only the first N clips")
    parser.add_argument("--num-workers", type=int, default=0, help="decoding processes (default: 0)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the YAML fragment here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for flag, value, low in (("--sample-rate", args.sample_rate, 1), ("--num-mel-bins", args.num_mel_bins, 1),
                             ("--max-clips", args.max_clips, 1), ("--num-workers", args.num_workers, 0)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    cli.setup_logging()
    logging.getLogger("asit.data.stats").setLevel(logging.ERROR)  # skips are summarised at the end

    with cli.usage_errors(parser, ConfigError, ManifestError):
        data = load_config(args.config).data
        entries = load_manifest(args.manifest)
    sample_rate = args.sample_rate if args.sample_rate is not None else data.sample_rate
    num_mel_bins = args.num_mel_bins if args.num_mel_bins is not None else data.num_mel_bins
    with cli.user_errors(ValueError):
        stats = compute_fbank_stats(entries, sample_rate=sample_rate, num_mel_bins=num_mel_bins,
                                    max_clips=args.max_clips, num_workers=args.num_workers,
                                    progress=not args.no_progress)

    snippet = stats.yaml_snippet(sample_rate, num_mel_bins)
    print(f"# {sample_rate} Hz, {num_mel_bins} mel bins, {args.manifest}")
    print(snippet, end="")
    recipe = args.config or "<recipe>"
    print(f"# train with: scripts/pretrain.py --config {recipe} {stats.overrides()}")
    if stats.skipped:
        for message in stats.skipped_files:
            print(f"# skipped {message}", file=sys.stderr)
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(stats.skipped.items()))
        print(f"# skipped {sum(stats.skipped.values())} clips ({reasons}); scripts/check_data.py lists every bad "
              "file and can write a clean manifest", file=sys.stderr)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(snippet, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
