"""Plumbing shared by the command-line tools in ``scripts/``: logging setup and the exit on a user error.

A script decorates its ``main(argv)`` with :func:`command` and wraps each step that can fail on the
user's input in :func:`user_errors`, naming the exceptions that mean "bad input" there (a missing
file, an unreadable manifest, a setting that cannot work). Such an error is reported as one line on
stderr (or through a logger) and ``main`` returns 1; anything else keeps its traceback. Errors found
while reading the arguments and the config go through :func:`usage_errors` instead, which prints the
usage and exits with status 2, like argparse's own checks. Only the standard library is imported
here, so a script pays for nothing it does not use.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["LOG_FORMAT", "command", "rank", "setup_logging", "usage_errors", "user_errors"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Reported(Exception):
    """A user error that :func:`user_errors` has already reported; :func:`command` turns it into exit 1."""


def rank() -> int:
    """This process's rank under torchrun (the ``RANK`` variable); 0 when started without it."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(*, rank_zero_only: bool = False) -> None:
    """INFO-level logging to stderr in the scripts' format; ``rank_zero_only`` keeps the other ranks of
    a torchrun job to warnings and errors."""
    quiet = rank_zero_only and rank() != 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=LOG_FORMAT)


@contextmanager
def usage_errors(parser: argparse.ArgumentParser, *errors: type[BaseException]) -> Iterator[None]:
    """Inside the block, ``errors`` end the program through ``parser.error``: the usage and the
    message on stderr, exit status 2."""
    try:
        yield
    except errors as err:
        parser.error(str(err))


@contextmanager
def user_errors(*errors: type[BaseException], log: logging.Logger | None = None) -> Iterator[None]:
    """Inside the block, ``errors`` are reported at once and make the :func:`command` return 1.

    The report is ``error: <message>`` on stderr, or with ``log`` one ERROR record (the traceback
    at DEBUG level). Code after the block does not run; ``finally`` clauses around it do.
    """
    try:
        yield
    except errors as err:
        if log is None:
            print(f"error: {err}", file=sys.stderr)
        else:
            log.error("%s", err)
            log.debug("raised here:", exc_info=err)
        raise _Reported from err


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a script's ``main(argv) -> int``: a user error reported by :func:`user_errors`
    becomes the return value 1 (the exit status)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except _Reported:
            return 1

    return wrapper
