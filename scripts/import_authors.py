#!/usr/bin/env python
"""Turn an ASiT authors' checkpoint (their main_ASiT.py's .pth) into an asit encoder file.

    python scripts/import_authors.py checkpoint.pth --out authors_v1.safetensors [--version v1]
    python scripts/import_authors.py ASiT_v2.pth --out authors_v2.safetensors --version v2 [--transpose-patches]

The result is what pretraining's teacher_encoder.safetensors is (timm names plus metadata: sample
rate, fbank statistics, input size, heads), so scripts/finetune.py (encoder=...),
scripts/linear_probe.py, scripts/extract.py and asit.hear.load_model accept it. The file is read
with torch.load(weights_only=True), allowing the argparse.Namespace the authors store under "args".
Defaults: the teacher, the version's sample rate (v1 32 kHz, v2 16 kHz), AudioSet fbank statistics,
a 592 x 128 input, the heads of the checkpoint's args.arch or of the preset with the same width.
"""

from __future__ import annotations

import argparse
import sys

from asit import cli
from asit.data import AUDIOSET_MEAN, AUDIOSET_STD
from asit.encoder import EncoderError, load_encoder
from asit.encoder.interop import export_authors_checkpoint


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the authors' checkpoint (.pth) with student/teacher dicts")
    parser.add_argument("--out", required=True, help="encoder file to write (.safetensors)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--version", choices=("v1", "v2"), default="v1",
                        help="v1: the paper's 32 kHz models; v2: the released 16 kHz checkpoint")
    parser.add_argument("--transpose-patches", action="store_true",
                        help="the weights expect frequency-first input (v2 only): convert to time-first")
    parser.add_argument("--img-size", type=int, nargs=2, default=(592, 128), metavar=("FRAMES", "MELS"),
                        help="input window in fbank frames and mel bins (default 592 128)")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (default: from args.arch)")
    parser.add_argument("--sample-rate", type=int, default=None, help="default: 32000 for v1, 16000 for v2")
    parser.add_argument("--mean", type=float, default=AUDIOSET_MEAN, help="fbank mean (default AudioSet's)")
    parser.add_argument("--std", type=float, default=AUDIOSET_STD, help="fbank std (default AudioSet's)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    with cli.user_errors(EncoderError, ValueError):
        path = export_authors_checkpoint(
            args.checkpoint, args.out, which=args.which, version=args.version,
            transpose_patches=args.transpose_patches, img_size=tuple(args.img_size), num_heads=args.num_heads,
            sample_rate=args.sample_rate, mean=args.mean, std=args.std,
        )
        encoder = load_encoder(path)  # what every downstream tool will do with it
    blocks = encoder.backbone.blocks
    print(f"wrote {path}: {args.which} of {args.checkpoint}, width {encoder.embed_dim}, {len(blocks)} blocks, "
          f"{blocks[0].attn.num_heads} heads, {encoder.target_frames} x {encoder.num_mel_bins} input, "
          f"{encoder.sample_rate} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
