#!/usr/bin/env python
"""Pack a manifest into WebDataset tar shards for ``data.train_manifest=shards:...``.

    python scripts/make_shards.py /data/as2m.json --out /data/as2m_shards/as2m-%06d.tar
    python scripts/make_shards.py /data/wavs --out shards/demo-%06d.tar --shard-size 256MB

Each clip becomes one sample: its audio bytes with the original extension (flac, wav, ...) and a
JSON member with its labels, manifest index and source path. The clips are packed in a shuffled
order (``--seed``; ``--keep-order`` keeps the manifest's), so that no shard holds one class of a
sorted manifest. ``index.json`` in the output folder lists the shards and their clip counts; the
reader splits each epoch's clips between ranks and loader workers by these counts, and reports a
shard that delivers fewer (cut short, unreadable) as skipped
clips, so keep the index with the shards and rewrite both together. Train on them with
``data.train_manifest=shards:/data/as2m_shards`` (the folder) or a brace pattern such as
``shards:/data/as2m_shards/as2m-{000000..000099}.tar``.

Before packing, every file's header is checked by training's rules (as ``scripts/check_data.py`` does):
a file training would refuse (missing, empty, unreadable, truncated, bad-sample-rate, too-long) is not
packed, and is named on stderr with its reason (``skipped path: reason (detail)``), followed by the
counts. The manifest indices stored in the shards are those of the packed clips. ``--no-check`` packs
every file as it is (bad ones are then skipped when read, during training).
"""

from __future__ import annotations

import argparse
import sys

from asit import cli
from asit.data import ManifestError, load_manifest
from asit.data.check import check_entries
from asit.data.shards import parse_shard_size, write_shards


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="JSON/CSV manifest or folder of audio files")
    parser.add_argument("--out", required=True, help="shard name pattern with one %%d placeholder, "
                                                     "e.g. dir/prefix-%%06d.tar")
    parser.add_argument("--shard-size", default="1000",
                        help="clips per shard (1000) or bytes per shard (256MB, 2GB); default 1000 clips")
    parser.add_argument("--index", default=None, help="index file (default: index.json next to the shards)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the packing order: clips are packed shuffled, so that a shard (and so a "
                             "batch) does not hold one class of a class-sorted manifest (default 0)")
    parser.add_argument("--keep-order", action="store_true", help="pack in the manifest's order instead")
    parser.add_argument("--no-check", action="store_true",
                        help="pack every file without checking its header (bad files are skipped at read time)")
    parser.add_argument("--workers", type=int, default=0, help="header-checking processes (default 0: this one)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    cli.setup_logging()

    with cli.usage_errors(parser, ValueError, ManifestError):
        max_count, max_bytes = parse_shard_size(args.shard_size)
        entries = load_manifest(args.manifest)
    if not args.no_check:
        report = check_entries(entries, workers=args.workers, progress=True)
        for bad in report.bad:
            print(f"skipped {bad}", file=sys.stderr)
        if report.bad:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in report.counts.items())
            print(f"skipped {len(report.bad)} of {report.total} files ({reasons})", file=sys.stderr)
            entries = [entries[i] for i in report.good_indices()]
        if not entries:
            print("error: no file of the manifest can be packed", file=sys.stderr)
            return 1
    with cli.user_errors(OSError, ValueError):
        index = write_shards(entries, args.out, max_count=max_count, max_bytes=max_bytes, index_path=args.index,
                             shuffle_seed=None if args.keep_order else args.seed, progress=True)
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
