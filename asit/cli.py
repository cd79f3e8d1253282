"""Plumbing shared by the command-line tools in ``scripts/``: logging setup and the exit on a user error.

A script decorates its ``main(argv)`` with :func:`command` and wraps each step that can fail on the
user's input in :func:`user_errors`, naming the exceptions that mean "bad input" there (a missing
file, an unreadable manifest, a setting that cannot work). Such an error is reported as one line on
stderr (or through a logger) and ``main`` returns 1; anything else keeps its traceback. Errors found
while reading the arguments go through :func:`usage_errors` instead, which prints the usage and exits
with status 2, like argparse's own checks.

Under torchrun each worker's error also goes to the launcher's error file (``TORCHELASTIC_ERROR_FILE``,
the JSON that ``torch.distributed.elastic``'s ``@record`` writes): the launcher's failure summary then
shows the one-line message (or, for an unexpected exception, its traceback) instead of a link to the
docs. The summary itself cannot be silenced. Only the standard library is imported here, so a script
pays for nothing it does not use.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["LOG_FORMAT", "command", "rank", "record_for_launcher", "setup_logging", "usage_errors", "user_errors"]

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


def record_for_launcher(message: str, details: str | None = None) -> None:
    """Under torchrun, write ``message`` to this worker's error file, where the launcher's summary reads
    the failure's "traceback" (``details``, default the message); nothing without torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message,
                          "extraInfo": {"py_callstack": details or message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
    except OSError:  # the report is a courtesy; the error itself is already on stderr
        pass


@contextmanager
def usage_errors(parser: argparse.ArgumentParser, *errors: type[BaseException]) -> Iterator[None]:
    """Inside the block, ``errors`` end the program through ``parser.error``: the usage and the
    message on stderr, exit status 2."""
    try:
        yield
    except errors as err:
        parser.error(str(err))


@contextmanager
def user_errors(*errors: type[BaseException], log: logging.Logger | None = None,
                every_rank: bool = True) -> Iterator[None]:
    """Inside the block, ``errors`` are reported at once and make the :func:`command` return 1.

    The report is ``error: <message>`` on stderr, or with ``log`` one ERROR record (the traceback
    at DEBUG level), and the message goes to the launcher's error file (:func:`record_for_launcher`).
    ``every_rank=False`` reports on rank 0 only (for errors every rank meets alike, such as a bad
    config: one line, not one per process). Code after the block does not run; ``finally`` clauses
    around it do.
    """
    try:
        yield
    except errors as err:
        if every_rank or rank() == 0:
            if log is None:
                print(f"error: {err}", file=sys.stderr)
            else:
                log.error("%s", err)
                log.debug("raised here:", exc_info=err)
        record_for_launcher(f"error: {err}")
        raise _Reported from err


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a script's ``main(argv) -> int``: a user error reported by :func:`user_errors`
    becomes the return value 1 (the exit status); any other exception is recorded for torchrun's
    summary (:func:`record_for_launcher`, with its traceback) and raised."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except _Reported:
            return 1
        except Exception as exc:
            record_for_launcher(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            raise

    return wrapper
