#!/usr/bin/env python
"""Figures from run outputs (PNG, matplotlib Agg).

    python scripts/plot.py runs/demo_cpu/log.jsonl                 # loss / lr curves -> runs/demo_cpu/log.png
    python scripts/plot.py runs/finetune/esc50/results.json -o esc50_classes.png --top 25

A ``.jsonl`` file is a training log (pretraining or fine-tuning): one panel per loss term, the
learning rate on its own axis, validation metrics when present. A ``.json`` file is an evaluation
result (fine-tuning or linear probe): a bar per class, or per fold when it has no per-class scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asit import cli
from asit.eval.plots import plot_results, plot_training_log


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="log.jsonl (training curves) or results .json (per-class bars)")
    parser.add_argument("-o", "--out", default=None, help="output PNG (default: the input with .png)")
    parser.add_argument("--top", type=int, default=30, help="results: best/worst classes shown when there are many")
    parser.add_argument("--title", default=None, help="training log: figure title")
    args = parser.parse_args(argv)
    src = Path(args.input)
    out = Path(args.out) if args.out else src.with_suffix(".png")
    with cli.user_errors(OSError, ValueError):
        if src.suffix == ".jsonl":
            plot_training_log(src, out, title=args.title)
        else:
            plot_results(src, out, top=args.top)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
