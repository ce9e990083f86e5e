"""The ``ldmflow`` command line: one subcommand per stage, each calling the same function as its rule."""

# One module per command group, each holding its commands' parsers and the functions they call:
# data (demo-data, embed), train (train-ae, select-ae, train-diffusion, train-controlnet), sample,
# evaluate (memorization, judge, evaluate), synthesize, memory and info (status, schemas); arguments holds the checked
# argument types, --set and add_command. This package is the environment's edge: only it reads os.environ.

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ldmflow.cli import data, evaluate, export, info, memory, sample, synthesize, train, utility
from ldmflow.cli.arguments import (
    device_name,
    existing_file,
    existing_path,
    float_range,
    int_range,
    output_dir,
    output_file,
)

__all__ = ["build_parser", "debug_requested", "device_name", "existing_file", "existing_path", "float_range",
           "int_range", "main", "output_dir", "output_file", "setup_logging"]

log = logging.getLogger("ldmflow")


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr, and to ``log_file`` too when given (the rules pass their ``log:`` file).

    Under DDP only rank 0 logs below WARNING, so a log file reads like a single-process run's.
    """
    from ldmflow.training.distributed import rank

    if rank() > 0:
        level = max(level, logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order ``ldmflow --help`` lists them."""
    parser = argparse.ArgumentParser(prog="ldmflow", description=__doc__)
    parser.add_argument("--log-file", type=output_file, help="also write the log to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a user error too (or set LDMFLOW_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data.add_demo_data(sub)
    train.add_commands(sub)
    sample.add_commands(sub)
    data.add_embed(sub)
    evaluate.add_commands(sub)
    export.add_commands(sub)
    utility.add_commands(sub)
    synthesize.add_commands(sub)
    memory.add_commands(sub)
    info.add_commands(sub)
    for p in sub.choices.values():  # --set KEY=VALUE of a plain command is checked like its option --KEY
        p.set_defaults(set_types={a.dest: a for a in p._actions if a.type is not None or a.choices is not None})
    return parser


def debug_requested(args: argparse.Namespace, environ) -> bool:
    """``--debug`` or ``LDMFLOW_DEBUG=1``: user errors show their traceback too."""
    return bool(getattr(args, "debug", False)) or environ.get("LDMFLOW_DEBUG", "").strip().lower() not in (
        "", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (see ``ldmflow.errors``: 0 done, 2 user error, 143 preempted,
    1 training cannot go on). A bug (any other exception) propagates with its traceback."""
    from ldmflow.errors import Preempted, describe, exit_code
    from ldmflow.training.distributed import init_from_env, shutdown

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage line and the error (exit 2), or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    debug = debug_requested(args, os.environ)
    try:
        init_from_env(os.environ)  # first: under torchrun, logging is quieter on ranks > 0
        setup_logging(args.log_file, logging.DEBUG if args.verbose else logging.INFO)
        args.func(args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        (log.warning if isinstance(exc, Preempted) else log.error)("%s", describe(exc), exc_info=debug)
        return code
    finally:
        shutdown()
    return 0
