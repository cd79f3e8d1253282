#!/usr/bin/env python
"""Find the audio files training would refuse, before hours of training.

    python scripts/check_data.py /data/my_corpus.json                          # every header (fast)
    python scripts/check_data.py /data/wavs --decode --workers 8                # decode every file
    python scripts/check_data.py /data/my_corpus.csv --write-clean clean.csv    # a manifest of the good files

Every file of the manifest (a JSON/CSV manifest or a folder of audio files) is checked by the rules
training applies: by default its header (missing, empty, unreadable, truncated, bad-sample-rate,
too-long); with ``--decode`` the whole file is decoded as the torch loader decodes it (also non-finite
and out-of-range samples, damage inside FLAC/OGG/MP3 streams). Each bad file is printed on stdout as
``path: reason (detail)``, then one line with the counts per reason. ``--write-clean PATH`` writes the
good files as a manifest (.json, .jsonl or .csv, by PATH's suffix) with the same labels.

Exit status: 0 when every file is good, 1 when bad files were found (the clean manifest, if asked for,
is written either way), 2 when the arguments or the manifest cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asit import cli
from asit.data import ManifestError, load_manifest
from asit.data.audio import MAX_SECONDS
from asit.data.check import check_entries
from asit.data.manifest import write_manifest


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="JSON/CSV manifest or folder of audio files")
    parser.add_argument("--decode", action="store_true",
                        help="decode every file as training does (slower; finds NaN/Inf samples and damaged "
                             "compressed streams), not only its header")
    parser.add_argument("--sample-rate", type=int, default=32000,
                        help="rate to decode at with --decode, as data.sample_rate (default 32000)")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                        help=f"longest clip accepted (default {MAX_SECONDS:.0f}, training's cap)")
    parser.add_argument("--write-clean", default=None, metavar="PATH",
                        help="write the good files to this manifest (.json, .jsonl or .csv)")
    parser.add_argument("--workers", type=int, default=0, help="checking processes (default 0: this one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for flag, value, low in (("--sample-rate", args.sample_rate, 1), ("--workers", args.workers, 0),
                             ("--max-seconds", args.max_seconds, 1e-9)):
        if value < low:
            parser.error(f"{flag} must be {'>= 0' if low == 0 else 'positive'}, got {value}")
    if args.write_clean is not None and Path(args.write_clean).suffix.lower() not in (".json", ".jsonl", ".csv"):
        parser.error(f"--write-clean {args.write_clean}: the name must end in .json, .jsonl or .csv")
    cli.setup_logging()

    with cli.usage_errors(parser, ManifestError):
        entries = load_manifest(args.manifest, check_exists=False)  # missing files are reported with the rest
    report = check_entries(entries, sample_rate=args.sample_rate, decode=args.decode, max_seconds=args.max_seconds,
                           workers=args.workers, progress=not args.no_progress)
    for bad in report.bad:
        print(bad)
    print(report.summary())
    good = report.good_indices()
    if args.write_clean is not None and not good:
        print(f"no good files: {args.write_clean} not written")
    elif args.write_clean is not None:
        with cli.user_errors(ManifestError, OSError):
            path = write_manifest([entries[i] for i in good], args.write_clean)
        print(f"wrote the {len(good)} good files to {path}")
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
