#!/usr/bin/env python
"""ASiT pretraining.

    python scripts/pretrain.py                                            # CPU demo (built-in data), one process
    torchrun --nproc_per_node=8 scripts/pretrain.py --config asit_vit_base \\
        data.train_manifest=/data/audioset_2m.json train.output_dir=runs/as2m_vitb
    python scripts/pretrain.py --config demo_cpu --resume                 # continue the latest checkpoint
    python scripts/pretrain.py --config demo_cpu --overwrite              # a new run; the old one is moved aside
    torchrun --nproc_per_node=8 --max-restarts=3 scripts/pretrain.py ...  # restarted workers resume by themselves

Any ``section.key=value`` argument overrides the recipe (see asit/config.py for every key).

A configuration error (an unknown key, a value out of range, a device or manifest that is not there)
is found before any process group starts and reported as one line, ``error: ...``, with exit status 1;
errors found while setting up or training (a damaged checkpoint, too many bad clips) are one ERROR log
line and status 1. Under torchrun the launcher adds its failure summary after that line (its
"traceback" entry repeats the message); with one process, ``python`` is quieter than ``torchrun``.

A new run refuses a train.output_dir that holds another run (use --resume or --overwrite). Ctrl-C or
SIGTERM finishes the current step, writes a checkpoint and exits with status 130 or 143; a second one
exits at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from asit import cli
from asit.config import Config, ConfigError, available_recipes, load_config
from asit.data import ManifestError
from asit.data.shards import is_shard_source, open_shard_source
from asit.encoder import EncoderError
from asit.train import BadDataError, NonFiniteLossError, Pretrainer, ReplicaMismatchError
from asit.train.checkpoint import CheckpointError
from asit.train.interrupts import Interrupted


def _check_early(cfg: Config) -> None:
    """The cheap checks of what the config names, made before any process group starts (so that under
    torchrun a mistake is one line per job, not a hung or torn-down group): the device and the manifest.

    Raises:
        ConfigError: ``train.device=cuda`` without a CUDA device.
        ManifestError: ``data.train_manifest`` names no file, folder or shard index.
    """
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available (train.device=auto picks the CPU)")
    source = cfg.data.train_manifest
    if source == "demo":
        return
    if is_shard_source(source):
        open_shard_source(source)  # reads the index (or lists the tars), not the clips
    elif not Path(source).expanduser().exists():
        raise ManifestError(f"{source}: manifest does not exist (data.train_manifest)")


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
    with cli.user_errors(ConfigError, ManifestError, every_rank=False):  # every rank has the same config
        cfg = load_config(args.config, args.overrides)
        _check_early(cfg)
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
