"""The ``musetwilight`` command line (EsoRex conventions); all argument parsing lives here.

Subcommands: ``run`` (like ``esorex muse_twilight``), ``demo``, ``simulate``, ``man``,
``compare`` and ``batch``; each parses its options into typed values and calls the
module that does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import MuseTwilightError, ParameterError
from ..params import PARAMETERS, Settings, config_text, format_value, make_settings, read_config

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "off": logging.CRITICAL + 10}
log = logging.getLogger("musetwilight")


# --------------------------------------------------------------------------- parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetwilight",
                                     description="MUSE twilight sky-flat recipe (muse_twilight) in Python.")
    parser.add_argument("--version", action="version", version=f"musetwilight {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="fewer messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="reduce a twilight set given as an SOF file (like esorex muse_twilight)",
                              description="Reduce a set of twilight sky flats: writes DATACUBE_SKYFLAT.fits "
                                          "and TWILIGHT_CUBE.fits.")
    add_recipe_parameters(run)
    add_run_arguments(run)
    run.set_defaults(handler=run_from_args)

    demo = commands.add_parser("demo", help="simulate a twilight set, reduce it and say where everything is")
    demo.add_argument("--scale", choices=("mini", "full"), default="mini", help="size of the simulated set")
    demo.add_argument("--out", type=Path, default=Path("musetwilight-demo"), help="output directory")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the simulation")
    demo.add_argument("--report", type=Path, default=None, metavar="DIR",
                      help="where the QA report goes [OUT/report]")
    demo.set_defaults(handler=demo_from_args)

    simulate = commands.add_parser("simulate", help="write a simulated MUSE twilight data set (raw frames, "
                                                    "calibrations, SOF)")
    add_simulate_arguments(simulate)
    simulate.set_defaults(handler=simulate_from_args)

    man = commands.add_parser("man", help="print the recipe's manual page (parameters, inputs, products)")
    man.add_argument("--show-hidden", action="store_true",
                     help="also list the expert parameters (vign*), as esorex --show-hidden")
    man.set_defaults(handler=man_from_args)

    compare = commands.add_parser("compare", help="compare two product sets (DATACUBE_SKYFLAT, TWILIGHT_CUBE) "
                                                  "pixel by pixel")
    add_compare_arguments(compare)
    compare.set_defaults(handler=compare_from_args)

    batch = commands.add_parser("batch", help="reduce many twilight sets, each into its own directory, serially "
                                              "or on a Dask cluster")
    add_batch_arguments(batch)
    batch.set_defaults(handler=batch_from_args)
    return parser


def add_recipe_parameters(parser: argparse.ArgumentParser, title: str = "recipe parameters "
                          "(as esorex muse_twilight)") -> None:
    """EsoRex-style options: one ``--<name>=<value>`` per recipe parameter, and --recipe-config."""
    group = parser.add_argument_group(title)
    for parameter in PARAMETERS:
        allowed = f" <{' | '.join(parameter.alternatives)}>" if parameter.choices else ""
        group.add_argument(f"--{parameter.name}", metavar="VALUE", default=None,
                           help=f"{parameter.help}{allowed} [{format_value(parameter.default)}]")
    parser.add_argument("--recipe-config", type=Path, help="EsoRex-style configuration file of parameters")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("."), help="where products are written [.]")
    parser.add_argument("--create-config", type=Path, metavar="FILE",
                        help="write the parameters (defaults, config and options merged) to FILE and exit")
    parser.add_argument("--log-file", type=Path, help="also write all messages to this file")
    parser.add_argument("--log-level", choices=tuple(LOG_LEVELS), default=None,
                        help="level of messages written to the log file [info]")
    parser.add_argument("--workers", type=_positive_int, default=None, help="IFUs reduced in parallel [cores]")
    add_scratch_argument(parser)
    parser.add_argument("--skip-cube", type=Path, default=None,
                        help="start from this DATACUBE_SKYFLAT (as ESO's MUSE_TWILIGHT_SKIP)")
    parser.add_argument("--scales", default=None,
                        help="24 comma-separated external per-IFU flux scales (as ESO's MUSE_TWILIGHT_SCALES)")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write the QA report (HTML page and PNG plots) into DIR")
    parser.add_argument("--timings-json", type=Path, default=None, help="write the per-stage timings to this JSON file")
    parser.add_argument("sof", nargs="?", type=Path, help="set-of-frames file: one 'path TAG' line per input")


def add_scratch_argument(parser: argparse.ArgumentParser) -> None:
    from ..io.space import SCRATCH_ENV

    parser.add_argument("--scratch-dir", type=Path, default=None, metavar="DIR",
                        help=f"where full-size runs keep the IFU tables (about 8 GB) [${SCRATCH_ENV}, else $TMPDIR]")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    from ..instrument import MODES
    from ..tools.simulate import SCALES

    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--scale", choices=SCALES, default="mini", help="mini (tests) or full (real size)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--nexp", type=int, default=3, help="number of SKYFLAT exposures")
    parser.add_argument("--ifus", type=_ifu_list, default=None, help="comma-separated IFU numbers")
    parser.add_argument("--illum", action="store_true", help="add an ILLUM exposure")
    parser.add_argument("--dark", action="store_true", help="add dark current and a MASTER_DARK")
    parser.add_argument("--badpix", action="store_true", help="write a BADPIX_TABLE")
    parser.add_argument("--vignetting", action="store_true", help="vignetted corner and VIGNETTING_MASK")
    parser.add_argument("--saturate", action="store_true", help="saturate the brightest pixels of exposure 1")
    parser.add_argument("--mode", choices=MODES, default="WFM-NOAO-N", help="instrument mode")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tools.compare import Tolerances

    defaults = Tolerances()
    parser.add_argument("ref", metavar="REF", help="reference products (directory or FITS file), e.g. ESO's")
    parser.add_argument("test", metavar="TEST", help="products to check (directory or FITS file)")
    parser.add_argument("--rtol-median", type=float, default=defaults.rtol_median,
                        help="limit on the median relative pixel difference (default %(default)g)")
    parser.add_argument("--rtol-p99", type=float, default=defaults.rtol_p99,
                        help="limit on the 99th percentile of the relative pixel difference (default %(default)g)")
    parser.add_argument("--rtol-max", type=float, default=defaults.rtol_max,
                        help="limit on the largest relative pixel difference (default: not checked)")
    parser.add_argument("--nan-mismatch-frac", type=float, default=defaults.nan_mismatch_frac,
                        help="largest fraction of pixels finite in one set only (default %(default)g)")
    parser.add_argument("--qc-rtol", type=float, default=defaults.qc_rtol,
                        help="relative tolerance for ESO QC / ESO DRS MUSE keywords (default %(default)g)")
    parser.add_argument("--file", dest="names", action="append", metavar="NAME",
                        help="compare only this file name (repeatable; default: every FITS file of REF)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sofs", nargs="+", type=Path, metavar="SOF", help="set-of-frames files, one per set")
    parser.add_argument("--output-root", type=Path, default=Path("."),
                        help="each set is written into OUTPUT_ROOT/<SOF stem>/ [.]")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="submit to this dask.distributed scheduler (e.g. tcp://host:8786)")
    where.add_argument("--workers", type=_positive_int, metavar="N",
                       help="start a local Dask cluster of N worker processes")
    parser.add_argument("--threads-per-worker", type=_positive_int, default=1, metavar="T",
                        help="threads of each local Dask worker [1]")
    parser.add_argument("--no-ifu-tasks", action="store_true",
                        help="on Dask, reduce each set's IFUs inside its own task (less data between workers)")
    parser.add_argument("--resume", action="store_true",
                        help="skip sets whose output directory already holds both products")
    parser.add_argument("--summary-json", type=Path, metavar="FILE", help="also write the summary as JSON")
    add_scratch_argument(parser)
    add_recipe_parameters(parser, "recipe parameters (as esorex muse_twilight, the same for every set)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _ifu_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of IFU numbers: {text!r}") from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Parameter values: defaults, then --recipe-config, then command-line options."""
    values = read_config(str(args.recipe_config)) if args.recipe_config else {}
    for parameter in PARAMETERS:
        given = getattr(args, parameter.name)
        if given is not None:
            values[parameter.name] = given
    return make_settings(values)


# --------------------------------------------------------------------------- progress


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


# --------------------------------------------------------------------------- handlers


def run_from_args(args: argparse.Namespace) -> int:
    from .. import recipe
    from ..core.fluxscale import parse_scales

    settings = settings_from_args(args)
    if args.create_config:
        args.create_config.write_text(config_text(settings.texts()))
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
                        scales=parse_scales(args.scales), workers=args.workers, progress=progress,
                        scratch_dir=args.scratch_dir)
    progress.done()
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    if result.skipped_ifus:
        print(f"skipped IFUs: {', '.join(map(str, sorted(result.skipped_ifus)))}")
    if args.report:
        print(f"QA report: {_write_report(args.report, result)}")
    print(f"total time: {result.timings['total']:.1f} s")
    if args.timings_json:
        args.timings_json.write_text(json.dumps(result.timings, indent=1))
    return 0


def _write_report(directory: Path, result, truth=None) -> Path:
    from ..tools.report import ReportError, write_report

    try:
        return write_report(directory, result.datacube_skyflat, result.twilight_cube, truth=truth)
    except ReportError as err:
        raise RuntimeError(f"QA report not written: {err}") from None


def demo_from_args(args: argparse.Namespace) -> int:
    from .. import recipe
    from ..tools.simulate import simulate_dataset

    data = simulate_dataset(args.out / "data", scale=args.scale, seed=args.seed)
    print(f"simulated {data.scale} set ({data.mode}, IFUs {','.join(map(str, data.ifus))}): {data.sof}")
    progress = Progress()
    result = recipe.run(data.sof, make_settings(), args.out / "products", progress=progress)
    progress.done()
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    print(f"injected truth: {data.truth_path}")
    print(f"QA report: {_write_report(args.report or args.out / 'report', result, data.truth_path)}")
    print(f"total time: {result.timings['total']:.1f} s")
    return 0


def simulate_from_args(args: argparse.Namespace) -> int:
    from ..tools.simulate import simulate_dataset

    result = simulate_dataset(args.out, scale=args.scale, seed=args.seed, nexp=args.nexp, ifus=args.ifus,
                              illum=args.illum, dark=args.dark, badpix=args.badpix,
                              vignetting=args.vignetting, mode=args.mode, saturate=args.saturate)
    print(f"simulated {result.scale} set ({result.mode}, IFUs {','.join(map(str, result.ifus))}) "
          f"in {result.out_dir}")
    print(f"SOF: {result.sof}")
    return 0


def man_from_args(args: argparse.Namespace) -> int:
    from .manpage import render

    print(render(show_hidden=args.show_hidden))
    return 0


def compare_from_args(args: argparse.Namespace) -> int:
    from ..tools.compare import Tolerances, compare_products

    tolerances = Tolerances(rtol_median=args.rtol_median, rtol_p99=args.rtol_p99, rtol_max=args.rtol_max,
                            nan_mismatch_frac=args.nan_mismatch_frac, qc_rtol=args.qc_rtol)
    report = compare_products(args.ref, args.test, tolerances, names=args.names)
    sys.stdout.write(report.format() + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def batch_from_args(args: argparse.Namespace) -> int:
    from .batch import dask_client, run_batch

    settings = settings_from_args(args)
    progress = Progress()
    options = dict(settings=settings, output_root=args.output_root, resume=args.resume, progress=progress,
                   scratch_dir=args.scratch_dir)
    if args.scheduler or args.workers:
        try:
            quiet = logging.WARNING if getattr(args, "verbose", 0) <= 0 else None
            with dask_client(args.scheduler, args.workers, args.threads_per_worker, log_level=quiet) as client:
                if getattr(client, "dashboard_link", None):
                    print(f"Dask dashboard: {client.dashboard_link}")
                report = run_batch(args.sofs, client=client, distribute_ifus=not args.no_ifu_tasks, **options)
        except ImportError as err:
            log.error("%s", err)
            return 2
    else:
        report = run_batch(args.sofs, **options)
    progress.done()
    print(report.summary())
    if args.summary_json:
        args.summary_json.write_text(report.to_json())
    return report.exit_status


# --------------------------------------------------------------------------- main


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
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args) or 0)
    except (MuseTwilightError, OSError) as err:
        log.error("%s", err)
        return 1
    except RuntimeError as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: no product was written")
        return 130
