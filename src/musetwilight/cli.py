"""The ``musetwilight`` command line (EsoRex conventions).

Each subcommand lives in the module that does the work; that module offers
``add_arguments(parser)`` and ``run_from_args(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "simulate": ("simulate", "write a simulated MUSE twilight data set (raw frames, calibrations, SOF)"),
    "man": ("manpage", "print the recipe's manual page (parameters, inputs, products)"),
    "compare": ("compare", "compare two product sets (DATACUBE_SKYFLAT, TWILIGHT_CUBE) pixel by pixel"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musetwilight",
        description="MUSE twilight sky-flat recipe (muse_twilight) in Python.",
    )
    parser.add_argument("--version", action="version", version=f"musetwilight {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="fewer messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run_from_args)
    return parser


def configure_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(level=max(logging.DEBUG, min(logging.CRITICAL, level)),
                        format="%(asctime)s [%(levelname)7s] %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError) as err:
        logging.getLogger("musetwilight").error("%s", err)
        return 1
