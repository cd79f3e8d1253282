"""What a finished pretraining run made and what to do with it next, as text for the end of the run.

:func:`next_steps` names the exported encoder, the reconstruction pictures and the log, and gives the
linear-probe and plot commands with this run's paths, ready to paste. For the built-in demo corpus the probe
uses the demo's own labelled manifest (:func:`asit.data.demo.demo_dataset_dir`); for WebDataset shards, which
the probe cannot read, it asks for a labelled manifest.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from asit.config import Config

from .loaders import demo_manifest

__all__ = ["next_steps", "probe_manifest"]


def probe_manifest(cfg: Config) -> str | None:
    """The labelled manifest to probe the encoder on: the demo corpus's ``manifest.csv`` for
    ``data.train_manifest=demo``, the training manifest itself otherwise, None for shards."""
    source = cfg.data.train_manifest
    if source == "demo":
        return demo_manifest(cfg, make=False)
    if source.startswith("shards:"):
        return None
    return source


def _arg(path: str | os.PathLike) -> str:
    """A path for a shell command: ``~`` for the home folder, quoted when needed."""
    text, home = str(path), str(Path.home())
    if text.startswith(home + os.sep):
        return "~/" + shlex.quote(text[len(home) + 1:])
    return shlex.quote(text)


def next_steps(cfg: Config, run_dir: str | os.PathLike, encoder: str | os.PathLike) -> str:
    """A few lines for the end of the run: the encoder, pictures and log it made, then the probe and plot
    commands for them."""
    run_dir = Path(run_dir)
    manifest = probe_manifest(cfg)
    every = cfg.train.image_every_epochs
    lines = [f"run finished in {run_dir}/", f"  encoder:  {encoder}"]
    images = run_dir / "images"
    if every and images.is_dir():
        lines.append(f"  pictures: {images}/epoch_NNNN.png (clean, corrupted, reconstruction, reconstruction in the "
                     f"masked area, mask; every {every} epoch(s))")
    lines.append(f"  log:      {run_dir / 'log.jsonl'}")
    lines.append("next:")
    probe = f"python scripts/linear_probe.py --encoder {_arg(encoder)} --manifest "
    probe += _arg(manifest) if manifest else "LABELLED_MANIFEST  # shards cannot be probed: give a labelled manifest"
    lines.append(f"  {probe}")
    if manifest:
        lines.append(f"      # k-fold linear probe -> {Path(encoder).parent / 'probe.json'}; add --random-init "
                     f"for the baseline")
    lines.append(f"  python scripts/plot.py {_arg(run_dir / 'log.jsonl')}")
    lines.append(f"      # loss and learning-rate curves -> {run_dir / 'log.png'}")
    return "\n".join(lines)
