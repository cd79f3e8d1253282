#!/usr/bin/env python
"""ASiT pretraining.

    torchrun --nproc_per_node=1 scripts/pretrain.py                       # CPU demo (built-in data)
    torchrun --nproc_per_node=8 scripts/pretrain.py --config asit_vit_base \\
        data.train_manifest=/data/audioset_2m.json train.output_dir=runs/as2m_vitb
    python scripts/pretrain.py --config demo_cpu --resume                 # continue the latest checkpoint
    python scripts/pretrain.py --config demo_cpu --overwrite              # a new run; the old one is moved aside
    torchrun --nproc_per_node=8 --max-restarts=3 scripts/pretrain.py ...  # restarted workers resume by themselves

Any ``section.key=value`` argument overrides the recipe (see asit/config.py for every key).

A new run refuses a train.output_dir that holds another run (use --resume or --overwrite). Ctrl-C or
SIGTERM finishes the current step, writes a checkpoint and exits with status 130 or 143; a second one
exits at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from asit import cli
from asit.config import ConfigError, available_recipes, load_config
from asit.data import ManifestError
from asit.encoder import EncoderError
from asit.train import BadDataError, NonFiniteLossError, Pretrainer, ReplicaMismatchError
from asit.train.checkpoint import CheckpointError
from asit.train.interrupts import Interrupted


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo_cpu",
                        help=f"recipe name ({', '.join(available_recipes())}) or a YAML file "
                             "(default: demo_cpu)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest good checkpoint in train.output_dir (from scratch if "
                            "there is none); after a torchrun restart this happens anyway (train.auto_resume)")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run even if train.output_dir holds one: the old folder is renamed to "
                            "<output_dir>.old-<time> (nothing is deleted)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    cli.setup_logging(rank_zero_only=True)
    with cli.usage_errors(parser, ConfigError):
        cfg = load_config(args.config, args.overrides)
    log = logging.getLogger("asit")
    trainer = Pretrainer(cfg, resume=args.resume, overwrite=args.overwrite)
    try:
        # settings or input that cannot work (ValueError includes ManifestError)
        with cli.user_errors(CheckpointError, ValueError, log=log):
            trainer.setup()
        # EncoderError: the teacher's export at the end
        with cli.user_errors(BadDataError, CheckpointError, EncoderError, ManifestError, NonFiniteLossError,
                             ReplicaMismatchError, log=log):
            try:
                summary = trainer.train()
            except Interrupted as stop:  # every rank wrote its part of the checkpoint
                if cli.rank() == 0:
                    log.warning("%s", stop)
                return stop.exit_status
        if cli.rank() == 0:
            log.info(
                "done: %d steps in %.0f s, loss %.4f -> %.4f; encoder at %s", summary["steps"],
                summary["wall_time_s"], _or_nan(summary["first_loss"]), _or_nan(summary["last_loss"]),
                summary.get("encoder"))
    finally:
        trainer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
