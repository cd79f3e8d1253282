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
"""

from __future__ import annotations

import argparse
import sys

from asit import cli
from asit.data import ManifestError, load_manifest
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
    args = parser.parse_args(argv)
    cli.setup_logging()

    with cli.usage_errors(parser, ValueError, ManifestError):
        max_count, max_bytes = parse_shard_size(args.shard_size)
        entries = load_manifest(args.manifest)
    with cli.user_errors(OSError, ValueError):
        index = write_shards(entries, args.out, max_count=max_count, max_bytes=max_bytes, index_path=args.index,
                             shuffle_seed=None if args.keep_order else args.seed, progress=True)
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
