"""The ``musetwilight`` command line (EsoRex conventions).

``run`` and ``demo`` are defined here; the other subcommands live in the module
that does the work, which offers ``add_arguments(parser)`` and
``run_from_args(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .params import PARAMETERS, ParameterError, config_text, format_value, make_settings, read_config

ILLUM_MODELS = ("eso", "joint")  # --illum-model (musetwilight.illumination.MODELS)

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "off": logging.CRITICAL + 10}

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "simulate": ("simulate", "write a simulated MUSE twilight data set (raw frames, calibrations, SOF)"),
    "man": ("manpage", "print the recipe's manual page (parameters, inputs, products)"),
    "compare": ("compare", "compare two product sets (DATACUBE_SKYFLAT, TWILIGHT_CUBE) pixel by pixel"),
    "batch": ("batch", "reduce many twilight sets, each into its own directory, serially or on a Dask cluster"),
    "smooth": ("smooth", "post-process an existing DATACUBE_SKYFLAT into TWILIGHT_CUBE (ESO's MUSE_TWILIGHT_SKIP)"),
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
    run = commands.add_parser("run", help="reduce a twilight set given as an SOF file (like esorex muse_twilight)",
                              description="Reduce a set of twilight sky flats: writes DATACUBE_SKYFLAT.fits "
                                          "and TWILIGHT_CUBE.fits.")
    add_run_arguments(run)
    run.set_defaults(handler=run_from_args)
    demo = commands.add_parser("demo", help="simulate a twilight set, reduce it and say where everything is")
    demo.add_argument("--scale", choices=("mini", "full"), default="mini", help="size of the simulated set")
    demo.add_argument("--out", type=Path, default=Path("musetwilight-demo"), help="output directory")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the simulation")
    demo.add_argument("--report", type=Path, default=None, metavar="DIR",
                      help="where the QA report goes [OUT/report]")
    demo.add_argument("--illum-model", choices=ILLUM_MODELS, default="eso",
                      help="TWILIGHT_CUBE model; with joint the report compares both with the truth [eso]")
    demo.add_argument("--family", default=None, help="truth family of the simulated set (see simulate --family)")
    demo.set_defaults(handler=demo_from_args)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run_from_args)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """EsoRex-style options: one ``--<name>=<value>`` per recipe parameter, plus the run options."""
    group = parser.add_argument_group("recipe parameters (as esorex muse_twilight)")
    for parameter in PARAMETERS:
        allowed = f" <{' | '.join(parameter.choices)}>" if parameter.choices else ""
        group.add_argument(f"--{parameter.name}", metavar="VALUE", default=None,
                           help=f"{parameter.help}{allowed} [{format_value(parameter.default)}]")
    parser.add_argument("--output-dir", type=Path, default=Path("."), help="where products are written [.]")
    parser.add_argument("--recipe-config", type=Path, help="EsoRex-style configuration file of parameters")
    parser.add_argument("--create-config", type=Path, metavar="FILE",
                        help="write the parameters (defaults, config and options merged) to FILE and exit")
    parser.add_argument("--log-file", type=Path, help="also write all messages to this file")
    parser.add_argument("--log-level", choices=tuple(LOG_LEVELS), default=None,
                        help="level of messages written to the log file [info]")
    parser.add_argument("--workers", type=int, default=None, help="IFUs reduced in parallel [cores]")
    parser.add_argument("--skip-cube", type=Path, default=None,
                        help="start from this DATACUBE_SKYFLAT (as ESO's MUSE_TWILIGHT_SKIP)")
    parser.add_argument("--scales", default=None,
                        help="24 comma-separated external per-IFU flux scales (as ESO's MUSE_TWILIGHT_SCALES)")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write the QA report (HTML page and PNG plots) into DIR")
    parser.add_argument("--timings-json", type=Path, default=None, help="write the per-stage timings to this JSON file")
    parser.add_argument("--illum-model", choices=ILLUM_MODELS, default=None,
                        help="TWILIGHT_CUBE model (not an ESO parameter): eso (ESO's, bit-compatible) or joint "
                             "(one fit of the whole cube: smooth in wavelength, per-IFU and per-stack terms, "
                             "a vignetting surface; see the man page) [eso]")
    parser.add_argument("sof", nargs="?", type=Path, help="set-of-frames file: one 'path TAG' line per input")


def settings_from_args(args: argparse.Namespace):
    """Parameter values: defaults, then --recipe-config, then command-line options."""
    values = read_config(str(args.recipe_config)) if args.recipe_config else {}
    for parameter in PARAMETERS:
        given = getattr(args, parameter.name)
        if given is not None:
            values[parameter.name] = given
    return make_settings(values)


class Progress:
    """Per-IFU progress: a live status line on a terminal, log lines otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.live = stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        text = f"[{time.perf_counter() - self.start:7.1f} s] {message}"
        if self.live:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        else:
            logging.getLogger("musetwilight.progress").info("%s", text)

    def done(self) -> None:
        if self.live:
            self.stream.write("\n")


def run_from_args(args: argparse.Namespace) -> int:
    from . import merge, recipe

    settings = settings_from_args(args)
    if args.create_config:
        args.create_config.write_text(config_text(settings))
        print(f"wrote {args.create_config}")
        return 0
    if args.sof is None:
        raise ParameterError("no SOF file given (musetwilight run [options] FILE.sof)")
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
        handler.setLevel(LOG_LEVELS[args.log_level or "info"])
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)7s] %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(handler)
    progress = Progress()
    result = recipe.run(args.sof, settings, args.output_dir, skip_cube=args.skip_cube,
                        scales=merge.external_scales(args.scales), workers=args.workers, progress=progress,
                        illum_model=args.illum_model)
    progress.done()
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    if result.skipped_ifus:
        print(f"skipped IFUs: {', '.join(map(str, sorted(result.skipped_ifus)))}")
    if args.report:
        print(f"QA report: {_write_report(args.report, result)}")
    print(f"total time: {result.timings['total']:.1f} s")
    if args.timings_json:
        import json

        args.timings_json.write_text(json.dumps(result.timings, indent=1))
    return 0


def _write_report(directory: Path, result, truth=None, alternatives=None) -> Path:
    from .report import ReportError, write_report

    try:
        return write_report(directory, result.datacube_skyflat, result.twilight_cube, truth=truth,
                            fit=getattr(result, "illumination_fit", None), alternatives=alternatives)
    except ReportError as err:
        raise RuntimeError(f"QA report not written: {err}") from None


def demo_from_args(args: argparse.Namespace) -> int:
    from . import recipe
    from .simulate import simulate_dataset

    data = simulate_dataset(args.out / "data", scale=args.scale, seed=args.seed, family=args.family)
    print(f"simulated {data.scale} set ({data.mode}, IFUs {','.join(map(str, data.ifus))}): {data.sof}")
    progress = Progress()
    result = recipe.run(data.sof, make_settings(), args.out / "products", progress=progress,
                        illum_model=args.illum_model)
    progress.done()
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    print(f"injected truth: {data.truth_path}")
    alternatives = None
    if args.illum_model != "eso":  # the report shows ESO's model beside it, from the same cube
        eso_run = recipe.run(data.sof, make_settings(), None, skip_cube=result.paths["DATACUBE_SKYFLAT"])
        alternatives = {"eso": eso_run.twilight_cube}
    print(f"QA report: {_write_report(args.report or args.out / 'report', result, data.truth_path, alternatives)}")
    print(f"total time: {result.timings['total']:.1f} s")
    return 0


def configure_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(level=max(logging.DEBUG, min(logging.CRITICAL, level)),
                        format="%(asctime)s [%(levelname)7s] %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so that no temporary or partial product is left behind."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    if threading_is_main():
        signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError, RuntimeError) as err:
        logging.getLogger("musetwilight").error("%s", err)
        return 1
    except KeyboardInterrupt:
        logging.getLogger("musetwilight").error("interrupted: no product was written")
        return 130


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
