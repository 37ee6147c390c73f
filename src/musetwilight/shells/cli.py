"""The ``musetwilight`` command line (EsoRex conventions); all argument parsing lives here.

Subcommands: ``run`` (like ``esorex muse_twilight``), ``demo``, ``simulate``, ``man``,
``compare`` and ``batch``; each parses its options into typed values and calls the
module that does the work.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import MuseTwilightError, OutputError, ParameterError, os_error_text
from ..instrument import NUM_IFUS, ifu_ranges
from ..params import PARAMETERS, RECIPE, IllumModel, Settings, config_text, format_value, make_settings, read_config

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "off": logging.CRITICAL + 10}
LOG_FORMAT = "%(asctime)s [%(levelname)7s] %(name)s: %(message)s"
PROGRESS_LOGGER = "musetwilight.progress"
OWN_LOGGERS = ("musetwilight", "cpl")  # the others (Dask, Numba, ...) log warnings and errors only
log = logging.getLogger("musetwilight")


# --------------------------------------------------------------------------- parsers


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (``--resamp`` is not ``--resample``), with EsoRex-style
    "[default]" help, and a suggestion for a mistyped option ("did you mean --overscan?")."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            message += suggestion(self, unknown.group(1).split())
        super().error(message)


class HelpFormatter(argparse.HelpFormatter):
    """Adds "[default]" to each option's help that does not state its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
                and "[" not in text and "%(default)" not in text):
            text += " [%(default)s]"
        return text


def suggestion(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """" (did you mean --overscan?)" for options close to ``parser``'s, else ""."""
    known = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    hints = []
    for word in unknown:
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
            hints += [f"{word.split('=', 1)[0]}: did you mean {close[0]}?"] if close else []
    return f" ({'; '.join(hints)})" if hints else ""


def add_logging_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Console and log-file verbosity, independent of each other (as esorex --msg-level and
    --log-level); accepted before and after the subcommand."""
    unset = None if top else argparse.SUPPRESS
    suffix = "" if top else "_after"
    group = parser.add_argument_group("messages")
    group.add_argument("-v", "--verbose", dest="verbose" + suffix, action="count", default=0 if top else unset,
                       help="one level more on the console (repeatable)")
    group.add_argument("-q", "--quiet", dest="quiet" + suffix, action="count", default=0 if top else unset,
                       help="one level less on the console (repeatable); the log file is not affected")
    group.add_argument("--msg-level", choices=tuple(LOG_LEVELS), default=unset,
                       help="level of the messages on the console, as esorex --msg-level [info]")
    group.add_argument("--log-file", type=Path, default=unset, metavar="FILE",
                       help="also write the messages to FILE, at --log-level")
    group.add_argument("--log-level", choices=tuple(LOG_LEVELS), default=unset,
                       help="level of the messages in --log-file, as esorex --log-level [info]")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="musetwilight", description="MUSE twilight sky-flat recipe (muse_twilight) in Python.")
    parser.add_argument("--version", action="version", version=f"musetwilight {__version__}")
    add_logging_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, **kwargs)
        add_logging_options(sub, top=False)
        return sub

    run = command("run", help="reduce a twilight set given as an SOF file (like esorex muse_twilight)",
                  description="Reduce a set of twilight sky flats: writes DATACUBE_SKYFLAT.fits and "
                              "TWILIGHT_CUBE.fits.")
    add_recipe_parameters(run)
    add_run_arguments(run)
    run.set_defaults(handler=run_from_args)

    demo = command("demo", help="simulate a twilight set, reduce it and say where everything is",
                   description="Simulate a twilight set, reduce it, write the QA report and say where everything is.")
    demo.add_argument("--scale", choices=("mini", "full"), default="mini", help="size of the simulated set")
    demo.add_argument("--out", type=Path, default=Path("musetwilight-demo"), help="output directory")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the simulation")
    demo.add_argument("--report", type=Path, default=None, metavar="DIR",
                      help="where the QA report goes [OUT/report]")
    demo.add_argument("--family", default=None,
                      help="truth family of the simulated set (as simulate --family)")
    add_illum_model_argument(demo, " (with joint the report compares both models with the injected truth)")
    demo.set_defaults(handler=demo_from_args)

    simulate = command("simulate", help="write a simulated MUSE twilight data set (raw frames, calibrations, SOF)",
                       description="Write a simulated MUSE twilight data set: raw frames, calibrations, an SOF "
                                   "and the injected truth.")
    add_simulate_arguments(simulate)
    simulate.set_defaults(handler=simulate_from_args)

    man = command("man", help="print the recipe's manual page (parameters, inputs, products)")
    man.add_argument("--show-hidden", action="store_true",
                     help="also list the expert parameters (vign*), as esorex --show-hidden")
    man.set_defaults(handler=man_from_args)

    compare = command("compare", help="compare two product sets (DATACUBE_SKYFLAT, TWILIGHT_CUBE) pixel by pixel "
                                      "and keyword by keyword")
    add_compare_arguments(compare)
    compare.set_defaults(handler=compare_from_args)

    batch = command("batch", help="reduce many twilight sets, each into its own directory, serially or on a Dask "
                                  "cluster")
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
    parser.add_argument("--create-config", metavar="FILE|TRUE",
                        help="write the parameters (defaults, config and options merged) to FILE, or with TRUE to "
                             f"$HOME/.esorex/{RECIPE}.rc as esorex does, and exit")
    parser.add_argument("--workers", type=_positive_int, default=None, help="IFUs reduced in parallel [cores]")
    add_scratch_argument(parser)
    add_memory_argument(parser)
    add_illum_model_argument(parser)
    parser.add_argument("--skip-cube", type=Path, default=None,
                        help="start from this DATACUBE_SKYFLAT (as ESO's MUSE_TWILIGHT_SKIP)")
    parser.add_argument("--scales", default=None,
                        help="24 comma-separated external per-IFU flux scales (as ESO's MUSE_TWILIGHT_SCALES)")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write the QA report (HTML page and PNG plots) into DIR")
    parser.add_argument("--timings-json", type=Path, default=None, help="write the per-stage timings to this JSON file")
    parser.add_argument("sof", nargs="?", type=Path, help="set-of-frames file: one 'path TAG' line per input")


def add_illum_model_argument(parser: argparse.ArgumentParser, more: str = "") -> None:
    from ..recipe import ILLUM_MODEL_ENV

    parser.add_argument("--illum-model", type=_illum_model, default=None, metavar="eso|joint",
                        help="the TWILIGHT_CUBE model (musetwilight's option, not one of ESO's parameters): eso, "
                             "ESO's, bit for bit; joint, one fit of the whole cube (smooth in wavelength, per-IFU "
                             f"and per-stack terms, a vignetting surface; see musetwilight man){more} "
                             f"[${ILLUM_MODEL_ENV}, else eso]")


def _illum_model(text: str) -> IllumModel:
    try:
        return IllumModel.parse(text, "--illum-model")
    except ParameterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_scratch_argument(parser: argparse.ArgumentParser) -> None:
    from ..io.space import SCRATCH_ENV

    parser.add_argument("--scratch-dir", type=Path, default=None, metavar="DIR",
                        help=f"where full-size runs keep the IFU tables (about 8 GB) [${SCRATCH_ENV}, else $TMPDIR]")


def add_memory_argument(parser: argparse.ArgumentParser) -> None:
    from ..memory import MEMORY_ENV

    parser.add_argument("--max-memory", type=_memory_size, default=None, metavar="SIZE",
                        help="the most memory a set's reduction may use, e.g. 4G or 3.5GiB: fewer IFUs at once, "
                             "IFU tables on disk, smaller resampling tiles, or a refusal before any work "
                             f"[${MEMORY_ENV}; the cgroup, ulimit -v and a Dask worker's limit are found anyway]")


def _memory_size(text: str) -> int:
    from ..memory import parse_size

    try:
        return parse_size(text)
    except ParameterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    from ..instrument import MODES
    from ..tools.simulate import FAMILY_COMPONENTS, SCALES

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
    parser.add_argument("--archive", action="store_true",
                        help="raw frames named and keyworded as ESO's archive files (MUSE.<DATE-OBS>.fits, TPL ...)")
    parser.add_argument("--fpack", action="store_true",
                        help="raw frames tile-compressed (.fits.fz), as the archive delivers them (implies --archive)")
    parser.add_argument("--family", default=None,
                        help="truth family: " + ", ".join(FAMILY_COMPONENTS) + " joined by '+' (chromatic, "
                             "per-IFU, per-stack fields, WFM corner / NFM edge vignetting shapes; formulas in "
                             "truth.json)")
    parser.add_argument("--brightness", type=float, default=1.0,
                        help="sky level relative to the default twilight (noise: deep > 1 > shallow) [1]")


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
    add_memory_argument(parser)
    add_illum_model_argument(parser)
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


# --------------------------------------------------------------------------- console and progress


class Console(logging.StreamHandler):
    """Messages on stderr.  On a terminal the progress messages (logger ``musetwilight.progress``)
    share one live status line, which is cleared before any other message and drawn again
    after it, so that the two never run into each other; elsewhere they are lines too."""

    def __init__(self, stream=None):
        super().__init__(stream if stream is not None else sys.stderr)
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.status = ""

    def emit(self, record: logging.LogRecord) -> None:
        if not self.live:
            super().emit(record)
            return
        if record.name == PROGRESS_LOGGER:
            self.status = record.getMessage()
        else:
            self.stream.write("\r\033[K")
            super().emit(record)
        self._draw()

    def _draw(self) -> None:
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r\033[K" + self.status[:width])
        self.flush()

    def finish(self) -> None:
        """End the status line (the last progress message stays on the screen)."""
        if self.live and self.status:
            self.stream.write("\n")
            self.flush()
        self.status = ""


class LogFile(logging.FileHandler):
    """The --log-file handler (a class of its own, so that a new configuration replaces it)."""


class Progress:
    """Stage messages with the time since the start, logged as ``musetwilight.progress``
    (the console shows them as a live status line on a terminal, the log file as lines)."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        logging.getLogger(PROGRESS_LOGGER).info("[%7.1f s] %s", time.perf_counter() - self.start, message)

    def done(self) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, Console):
                handler.finish()


# --------------------------------------------------------------------------- handlers


def config_destination(value: str) -> Path | None:
    """Where --create-config writes: TRUE is $HOME/.esorex/muse_twilight.rc (as EsoRex), FALSE nothing."""
    if value.upper() == "TRUE":
        return Path.home() / ".esorex" / f"{RECIPE}.rc"
    if value.upper() == "FALSE":
        return None
    return Path(value)


def run_from_args(args: argparse.Namespace) -> int:
    from .. import recipe
    from ..core.fluxscale import parse_scales

    settings = settings_from_args(args)
    config = config_destination(args.create_config) if args.create_config else None
    if config is not None:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(config_text(settings.texts()))
        print(f"wrote {config}")
        return 0
    if args.sof is None:
        raise ParameterError("no SOF file given (musetwilight run [options] FILE.sof)")
    progress = Progress()
    result = recipe.run(args.sof, settings, args.output_dir, skip_cube=args.skip_cube,
                        scales=parse_scales(args.scales), workers=args.workers, progress=progress,
                        scratch_dir=args.scratch_dir, max_memory=args.max_memory, illum_model=args.illum_model)
    progress.done()
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    print(ifu_summary(result))
    if args.report:
        report = _write_report(args.report, result, args.sof)
        if report:
            print(f"QA report: {report}")
    print(f"total time: {result.timings['total']:.1f} s")
    if args.timings_json:
        _after_products("timings", lambda: args.timings_json.write_text(
            json.dumps({"timings": result.timings, "stages": result.stages,
                        "memory": result.memory.as_dict() if result.memory else None}, indent=1)))
    return 0


def ifu_summary(result) -> str:
    """The IFUs line: reduced, absent (not in the set) and failed, as the product header lists them."""
    reduced = [ifu for ifu in range(1, NUM_IFUS + 1) if ifu not in result.skipped_ifus]
    parts = [f"reduced {ifu_ranges(reduced)}"]
    if result.ifus("absent"):
        parts.append(f"absent (not in the set) {ifu_ranges(result.ifus('absent'))}")
    if result.ifus("failed"):
        parts.append(f"failed {ifu_ranges(result.ifus('failed'))}")
    return "IFUs: " + "; ".join(parts)


def _after_products(what: str, write) -> bool:
    """Write an extra (report, timings) once the products are there: a failure is a warning, not an error."""
    try:
        write()
    except OSError as err:
        log.warning("%s not written (the products are): %s", what, os_error_text(err))
        return False
    return True


def _write_report(directory: Path, result, sof: Path, truth=None, alternatives=None) -> Path | None:
    """The QA report's index.html (with the IFU outlines from the set's GEOMETRY_TABLE, what the
    joint model fitted and the ``alternatives``' TWILIGHT_CUBEs), or None (with a warning saying
    why) when it could not be made."""
    from ..io.frames import parse_sof
    from ..tools.report import ReportError, write_report

    written: list[Path] = []
    try:
        geometry = parse_sof(sof).single("GEOMETRY_TABLE")
        _after_products("QA report", lambda: written.append(
            write_report(directory, result.datacube_skyflat, result.twilight_cube, truth=truth, geometry=geometry,
                         fit=result.illumination_fit, alternatives=alternatives)))
    except (ReportError, MuseTwilightError) as err:
        log.warning("QA report not written (the products are): %s", err)
    return written[0] if written else None


def demo_from_args(args: argparse.Namespace) -> int:
    from .. import recipe
    from ..tools.simulate import simulate_dataset

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
    if result.illumination_fit is not None:  # the report shows ESO's model beside it, from the same cube
        eso_run = recipe.run(data.sof, make_settings(), None, skip_cube=result.paths["DATACUBE_SKYFLAT"],
                             illum_model="eso")
        alternatives = {"eso": eso_run.twilight_cube}
    report = _write_report(args.report or args.out / "report", result, data.sof, data.truth_path, alternatives)
    if report:
        print(f"QA report: {report}")
    print(f"total time: {result.timings['total']:.1f} s")
    return 0


def simulate_from_args(args: argparse.Namespace) -> int:
    from ..tools.simulate import simulate_dataset

    result = simulate_dataset(args.out, scale=args.scale, seed=args.seed, nexp=args.nexp, ifus=args.ifus,
                              illum=args.illum, dark=args.dark, badpix=args.badpix,
                              vignetting=args.vignetting, mode=args.mode, saturate=args.saturate,
                              archive=args.archive, fpack=args.fpack, family=args.family,
                              brightness=args.brightness)
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
                   scratch_dir=args.scratch_dir, max_memory=args.max_memory, illum_model=args.illum_model)
    if args.scheduler or args.workers:
        try:
            quiet = logging.WARNING if args.verbose + getattr(args, "verbose_after", 0) <= 0 else None
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


def configure_logging(args: argparse.Namespace) -> None:
    """The console at --msg-level stepped by -v/-q, the log file at --log-level, independently."""
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    quiet = args.quiet + getattr(args, "quiet_after", 0)
    console_level = LOG_LEVELS[args.msg_level or "info"] - 10 * verbose + 10 * quiet
    console_level = max(logging.DEBUG, min(LOG_LEVELS["off"], console_level))
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, (Console, LogFile))]:
        root.removeHandler(handler)
        handler.close()
    console = Console()
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    root.addHandler(console)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(console_level)
    if args.log_file:
        try:
            log_file = LogFile(args.log_file)
        except OSError as err:
            raise OutputError(f"{args.log_file}: cannot write the log file: {os_error_text(err).rsplit(': ', 1)[-1]}"
                              ) from None
        log_file.setLevel(LOG_LEVELS[args.log_level or "info"])
        log_file.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S"))
        root.addHandler(log_file)
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(min(console_level, log_file.level))


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so that no temporary or partial product is left behind."""
    raise SystemExit(128 + signum)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; an unknown option of a subcommand gets that subcommand's suggestion."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        (choices.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        configure_logging(args)
        return int(args.handler(args) or 0)
    except MuseTwilightError as err:
        log.error("%s", err)
        return 1
    except OSError as err:
        log.error("%s", os_error_text(err))
        return 1
    except RuntimeError as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: no product was written")
        return 130
