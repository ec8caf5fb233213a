"""The command line: one module per family of commands, each parser beside its handler. Flags that mirror a
setting come from the config dataclasses (cli/flags.py): declared once, with their help text."""
from __future__ import annotations

import argparse
import logging
import sys

from tunelab.cli import data, runs, serve, train
from tunelab.cli.flags import add_config_flags, config_from_args
from tunelab.errors import UserError

__all__ = ["add_config_flags", "build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Adapt pretrained models to your task, measured.")
    sub = p.add_subparsers(dest="command", required=True)
    for family in (train, runs, serve, data):
        family.add_parsers(sub)
    return p


class _Terminal(logging.Formatter):
    """Progress lines as they are; warnings and errors as `tunelab: warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"tunelab: {record.levelname.lower()}: {text}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the one it was made with (a caller, a test's
    capture, may replace it between commands run in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property answers instead
        pass


def show_logs(level: int = logging.INFO) -> None:
    """Library code reports through the `tunelab` loggers; the command line shows them on stderr (stdout keeps
    the results). Once per process: a later call only sets the level."""
    logger = logging.getLogger("tunelab")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Terminal())
        logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    from tunelab import speed

    show_logs()
    speed.onednn_cache_setting()  # the process's own setting, made before any model runs (see there)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
