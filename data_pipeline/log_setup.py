"""What the command-line programs show: one logging setup for every CLI, with ``-v/--verbose`` and
``-q/--quiet``.

Library code (``data_pipeline``, ``kernels``, ``pretrain``) logs through ``logging.getLogger(__name__)``
and never configures logging, so a program embedding the loader or the trainer decides what it shows
(``logging.getLogger("pretrain").setLevel(...)``, its own handlers). The CLIs (``python -m
data_pipeline``, ``launch/*.py``, which log as ``launch.NAME``) call `setup_logging` once, after parsing
their arguments. It lives here because ``data_pipeline`` is the part every other part may import.

What a CLI shows by default is what it printed before logging existed: INFO messages as bare lines on
stderr, warnings and errors prefixed ``warning: `` / ``error: ``. Results a command prints for
programs to read (JSON, ``inspect``'s summary) are not log messages: they stay on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# the loggers a CLI sets the level of; other libraries' loggers stay at the root's WARNING
PROJECT_LOGGERS = ("data_pipeline", "kernels", "pretrain", "launch")


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="also show debug messages")
    group.add_argument("-q", "--quiet", action="store_true", help="show only warnings and errors")


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a message comes, not as it was at setup: a program (or
    pytest's capsys) that swaps ``sys.stderr`` afterwards still gets the lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def setup_logging(verbose: bool = False, quiet: bool = False, rank: int | None = None) -> None:
    """Show the project's messages at INFO (DEBUG with ``verbose``, WARNING and up with ``quiet``) on
    stderr. On a distributed job's ranks other than 0 (``rank``, else ``$RANK``) INFO is left out
    unless ``verbose``: the job says each thing once. Calling it again replaces the earlier setup."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0 and not verbose:
        level = max(level, logging.WARNING)
    reset_logging()
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logging.getLogger().addHandler(handler)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


def reset_logging() -> None:
    """Undo `setup_logging` (for tests that call a CLI's ``main`` in-process)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
