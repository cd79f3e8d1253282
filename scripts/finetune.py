#!/usr/bin/env python
"""Fine-tune a pretrained ASiT teacher encoder on a labelled task (AST/SSAST recipe).

    python scripts/finetune.py --preset demo encoder=runs/demo_cpu/teacher_encoder.safetensors
    torchrun --nproc_per_node=8 scripts/finetune.py --preset as20k \\
        encoder=runs/as2m_vitb/teacher_encoder.safetensors data.train_manifest=/data/as20k.json \\
        data.val_manifest=/data/as_eval.json data.label_csv=/data/class_labels_indices.csv
    python scripts/finetune.py --preset esc50 data.train_manifest=/data/ESC-50/audio \\
        data.fold_csv=/data/ESC-50/meta/esc50.csv train.output_dir=runs/esc50

Presets: asit/configs/finetune/*.yaml; any ``section.key=value`` argument overrides one (see
asit/finetune/config.py for every key). Results: ``<train.output_dir>/results.json``.
"""

from __future__ import annotations

import argparse
import sys

from asit import cli
from asit.config import ConfigError
from asit.data import ManifestError
from asit.encoder import EncoderError
from asit.finetune import available_presets, load_finetune_config, run_finetune


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo",
                        help=f"preset name ({', '.join(available_presets())}) or a YAML file (default: demo)")
    parser.add_argument("--resume", action="store_true",
                        help="continue after the last finished epoch (and fold) in train.output_dir, if any")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    if args.resume:
        args.overrides.append("train.resume=true")
    cli.setup_logging(rank_zero_only=True)
    with cli.usage_errors(parser, ConfigError):
        cfg = load_finetune_config(args.preset, args.overrides)
    with cli.user_errors(ManifestError, EncoderError, ConfigError, ValueError):
        result = run_finetune(cfg)
    if cli.rank() == 0:
        spread = f" ± {result['std']:.4f} over {len(result['folds'])} folds" if "folds" in result else ""
        print(f"{result['metric']} ({result['report']} model, {result['value_split']}): {result['value']:.4f}{spread} "
              f"-> {cfg.train.output_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
