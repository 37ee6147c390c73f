"""``musetwilight-esorex``: EsoRex 3.13's command line, running musetwilight for muse_twilight.

Linked as ``esorex`` first on PATH (or named as EDPS's ``esorex_path``), it takes the
command lines that pymusepipe, Reflex/EDPS, MUSEreduce, Aoide and shell scripts give
EsoRex 3.13.6::

    esorex [esorex-options] muse_twilight [muse_twilight-options] sof [sof ...]

and behaves as EsoRex does: the global options below (``--opt=value``, a bare boolean
flag meaning TRUE, unique prefixes, one or two dashes), their ``ESOREX_*`` variables
and configuration files, layered as EsoRex layers them (built-in, then
``~/.esorex/esorex.rc`` or else ``/etc/esorex.rc``, then ``--config``/ESOREX_CONFIG, then
the environment, then the command line); recipe parameters from
``~/.esorex/muse_twilight.rc``, ``--recipe-config``/ESOREX_RECIPE_CONFIG and the command
line; SOF files read as EsoRex reads them; messages on stdout (errors on stderr) and a
log file in EsoRex's layouts; products named, signed, moved, listed and protected as the
options say; EsoRex's exit statuses.  Any other recipe is handed unchanged to the real
esorex (``MUSETWILIGHT_ESOREX``, else the next ``esorex`` on PATH that is not this one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import MuseTwilightError
from ..params import CONTEXT, PARAMETERS, RECIPE, Parameter, lookup, make_settings, read_config

ESOREX_VERSION = "3.13.6"
CALLER = "esorex.caller"
REAL_ESOREX_ENV = "MUSETWILIGHT_ESOREX"
_DELEGATED_ENV = "_MUSETWILIGHT_ESOREX_DELEGATED"
SYSTEM_CONFIG = Path("/etc/esorex.rc")
BANNER = f"\n     ***** ESO Recipe Execution Tool, version {ESOREX_VERSION}  *****\n\n"
LIBRARIES = (f"musetwilight = {__version__} (muse_twilight of MUSE 2.8.7 in Python, "
             f"EsoRex {ESOREX_VERSION} command line)")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "off": logging.CRITICAL + 10}
LEVEL_TAGS = {logging.DEBUG: "[ DEBUG ]", logging.INFO: "[ INFO  ]", logging.WARNING: "[WARNING]",
              logging.ERROR: "[ ERROR ]"}
EXIT_FAILED, EXIT_FILE_NOT_FOUND, EXIT_NO_RECIPE, EXIT_BAD_RC_KEY, EXIT_BAD_RC_LINE = 255, 9, 13, 250, 254
MEGABYTE = 1e6


# --------------------------------------------------------------------------- the global options

@dataclass(frozen=True)
class GlobalOption:
    """One EsoRex option: type (bool or str), built-in default, help, variable, rc use, meaning here."""

    name: str
    type: type
    default: Any
    help: str
    env: str | None
    in_config: bool
    here: str
    choices: tuple[str, ...] = ()

    @property
    def fullname(self) -> str:
        return f"{CALLER}.{self.name}"


def _env(name: str) -> str:
    return "ESOREX_" + name.upper().replace("-", "_")


_LEVEL_NAMES = tuple(LEVELS)
OPTIONS: tuple[GlobalOption, ...] = (
    GlobalOption("help", bool, False, "Display this help and exit. If a recipe name is also given, then help "
                 "will be given for it as well.", None, False, "prints this help, or muse_twilight's"),
    GlobalOption("version", bool, False, "Display version information and exit.", None, False,
                 "prints the version (musetwilight's)"),
    GlobalOption("check-sof-exist", bool, False, "When TRUE, all the input files must exist  and be readable "
                 "before calling the recipe.", _env("check-sof-exist"), True,
                 "missing SOF entries are errors (exit 9) before the run; FALSE: the recipe reports them"),
    GlobalOption("config", str, "", "Configuration file to be used for EsoRex.", _env("config"), False,
                 "an EsoRex rc file layered over ~/.esorex/esorex.rc or /etc/esorex.rc"),
    GlobalOption("create-config", str, "FALSE", "Creates a configuration file for Esorex. If set to TRUE a config "
                 "file 'esorex.rc' is created in the '.esorex' directory in $HOME of the user.If a filename is "
                 "specified, a config file will be created accordingly. If a recipe is specified in the command "
                 "line, then the configuration file will be created for the recipe instead (called "
                 "'recipename.rc') Note that an existing file will be overwritten, but a backup file will be "
                 "copied to 'filename.rc.bak' in the same directory. If the filename ends with extension .json "
                 "then a machine-readable JSON format will be used.", _env("create-config"), False,
                 "writes the rc (or JSON) file with the current values, backs up an old one, runs nothing"),
    GlobalOption("link-dir", str, "/tmp", "The directory in which a symbolic link to each of the product files "
                 "should be written. The enable/disable switch to control whether the link is actually made is "
                 "the '--suppress-link' option.", _env("link-dir"), True,
                 "where --suppress-link=FALSE puts a symbolic link to each product"),
    GlobalOption("log-dir", str, ".", "Directory where to place the logfile.", _env("log-dir"), True,
                 "directory of the log file (must exist)"),
    GlobalOption("log-file", str, "esorex.log", "Filename of logfile.", _env("log-file"), True,
                 "name of the log file in --log-dir, EsoRex's layout, overwritten each run"),
    GlobalOption("log-level", str, "info", "Controls the severity level of messages that will be printed to "
                 "the logfile.", _env("log-level"), True, "log file level; off: no log file",
                 _LEVEL_NAMES),
    GlobalOption("no-datamd5", bool, False, "Disables the computation of the MD5 data hash for FITS product "
                 "files.", _env("no-datamd5"), True,
                 "no DATAMD5 in the products (with --no-checksum: DATAMD5 = 'Not computed', as ESO)"),
    GlobalOption("no-checksum", bool, False, "Disables the computation of the standard FITS product "
                 "checksums.", _env("no-checksum"), True, "no CHECKSUM/DATASUM in any product HDU"),
    GlobalOption("man-page", bool, False, "Display a manual page for the specified recipe, and then exit. Note "
                 "that this option only applies to recipes, and that it does nothing for esorex by itself. See "
                 "also the '--help' option.", _env("man-page"), False, "prints muse_twilight's manual page"),
    GlobalOption("mem-check", bool, False, "Report on memory status at completion of recipe execution.",
                 _env("mem-check"), True, "prints the peak memory to stderr after the run"),
    GlobalOption("msg-level", str, "info", "Controls the severity level of messages that will be printed to "
                 "the terminal.", _env("msg-level"), True,
                 "terminal level; debug adds the function name; off: banner only", _LEVEL_NAMES),
    GlobalOption("output-dir", str, ".", "The directory where the product files should be finally moved to "
                 "(all products are first created in the current dir).", _env("output-dir"), True,
                 "where the products go (must exist); written there directly, atomically"),
    GlobalOption("output-prefix", str, "out", "Prefix applied to any output file. For example, specifying "
                 "'pre' would translate 'filename.fits' to 'pre_0000.fits'. See also the '--suppress-prefix' "
                 "option.", _env("output-prefix"), True, "product names <prefix>_0000.fits ... when "
                 "--suppress-prefix=FALSE (PIPEFILE keeps the recipe's name, as ESO)"),
    GlobalOption("output-readonly", bool, False, "When TRUE, any existing product files in the specified output "
                 "directory will be set to read-only, for user, group and other. If FALSE, then EsoRex will use "
                 "the default permissions for that account/directory. destroy any pre-existing files. This "
                 "option exists for the Paranal operations environment. This option can additionally be used to "
                 "prevent EsoRex from overwriting pre-existing files.", _env("output-readonly"), True,
                 "products made mode 0444 (a later run still replaces them, as in ESO)"),
    GlobalOption("paf-config", str, "", "Configuration file for creation of PAF files.", _env("paf-config"),
                 True, "ignored (muse_twilight writes no PAF file), debug message"),
    GlobalOption("params", bool, False, "List the input parameters and their current settings (whether from the "
                 "command line or a configuration file) for the esorex application. Parameters are labelled "
                 "using the parameter's alias. If a recipe is also specified, then the list of its parameters "
                 "will also be generated in the same way.", _env("params"), True,
                 "prints the option and parameter values in force, runs nothing"),
    GlobalOption("products-sof", str, "", "Output file which contains the FITS files created by the recipe. If "
                 "the filename ends with extension .json then a machine-readable JSON formatwill be used.",
                 _env("products-sof"), True,
                 "lists the products ('path     TAG' lines, or JSON) after a successful run"),
    GlobalOption("recipes", bool, False, "Display a list of all available recipes (that are available in the "
                 "directory tree specified with '--recipe-dir').", _env("recipes"), True,
                 "lists muse_twilight (the real esorex lists the others)"),
    GlobalOption("recipe-config", str, "", "Configuration file for any selected recipe.", _env("recipe-config"),
                 True, "muse_twilight rc file (full parameter names), over ~/.esorex/muse_twilight.rc"),
    GlobalOption("recipe-dir", str, ".", "Directory containing recipe libraries. Note that esorex will "
                 "recursively search not only the specified directory, but all sub-directories below it as well. "
                 "Multiple directory heads may be specified, by separating the starting paths with colons (:).",
                 "ESOREX_PLUGIN_DIR", True, "ignored for muse_twilight (debug message); passed on for others"),
    GlobalOption("show-hidden", bool, False, "When TRUE recipe parameters which are declared as hidden by the "
                 "recipe are shown in the output of help and man page options.", None, True,
                 "also shows the hidden vign* parameters in --help and --man-page"),
    GlobalOption("suppress-link", bool, True, "When TRUE, no symbolic link is created to the output product. "
                 "However, if FALSE, then a symbolic link is created in the directory specified with the option "
                 "'--link-dir' for each product that is created by the recipe.", _env("suppress-link"), True,
                 "FALSE: a symbolic link to each product in --link-dir (target as formed, as ESO)"),
    GlobalOption("suppress-prefix", bool, False, "When TRUE, the original name of the output product, as "
                 "produced by the recipe, is maintained. If FALSE, then the name of the output file is changed "
                 "to the \"prefix_number\" format. The prefix can be altered using the '--output-prefix' "
                 "option.", _env("suppress-prefix"), True, "TRUE keeps DATACUBE_SKYFLAT.fits, TWILIGHT_CUBE.fits"),
    GlobalOption("time", bool, False, "Measure and show the recipe's execution time.", _env("time"), True,
                 "prints the run time, raw input size and processing rate on success"),
    GlobalOption("unload-plugin", bool, True, "When TRUE, the plugin is unloaded after execution. If FALSE, the "
                 "plugin is not unloaded after processing, so that a software like, e.g. valgrind, can be used "
                 "for debugging the executed recipe.", _env("unload-plugin"), True,
                 "ignored (no plugin to unload), debug message; FALSE warns as ESO"),
)
BY_NAME = {option.name: option for option in OPTIONS}


# --------------------------------------------------------------------------- messages

class Messages:
    """EsoRex's terminal lines (stdout, errors on stderr) and its log file, kept in memory."""

    def __init__(self, stdout=None, stderr=None):
        self.stdout, self.stderr = stdout or sys.stdout, stderr or sys.stderr
        self.msg_level, self.log_level = logging.INFO, logging.INFO
        self.components = False
        self.log_lines: list[str] = []
        self.recipe_started = False
        self._tids: dict[int, int] = {}
        self._lock = threading.Lock()

    def tid(self, thread: int | None = None) -> str:
        """``[tid=NNN] `` as OpenMP numbers its team: the main thread and the first worker are 000."""
        ident = threading.get_ident() if thread is None else thread
        with self._lock:
            if ident == threading.main_thread().ident:
                number = 0
            else:
                number = self._tids.setdefault(ident, len(self._tids))
        return f"[tid={number:03d}] "

    def emit(self, level: int, text: str, domain: str = "esorex", component: str = "", stamp: bool = True,
             thread: int | None = None, tid: bool | None = None) -> None:
        """One message: a terminal line (if at msg-level) and a log line (if at log-level)."""
        now = time.strftime("%H:%M:%S ") if stamp else ""
        tag = LEVEL_TAGS[min(max(level, logging.DEBUG), logging.ERROR) // 10 * 10]
        thread_id = self.tid(thread) if (self.recipe_started if tid is None else tid) else ""
        if level >= self.msg_level:
            where = f"{domain}: {component + ': ' if self.components else ''}"
            stream = self.stderr if level >= logging.ERROR else self.stdout
            stream.write(f"{now}{tag} {where}{thread_id}{text}\n")
            stream.flush()
        if level >= self.log_level:
            self.log_lines.append(f"{time.strftime('%H:%M:%S')} {tag} {component}: {self.tid(thread)}{text}")

    def error(self, text: str, **kw) -> None:
        self.emit(logging.ERROR, text, **kw)

    def warning(self, text: str, **kw) -> None:
        self.emit(logging.WARNING, text, **kw)

    def info(self, text: str, **kw) -> None:
        self.emit(logging.INFO, text, **kw)

    def debug(self, text: str, **kw) -> None:
        self.emit(logging.DEBUG, text, **kw)

    def write_log(self, path: Path, started: datetime) -> None:
        head = (f"\nStart time     : {started.strftime('%Y-%m-%dT%H:%M:%S')}\nProgram name   : esorex\n"
                f"Severity level : {LEVEL_TAGS.get(self.log_level, '[ INFO  ]')} \n\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + "".join(line + "\n" for line in self.log_lines))


class _Forward(logging.Handler):
    """The package's log records as EsoRex lines of the recipe (domain muse_twilight)."""

    def __init__(self, messages: Messages):
        super().__init__(logging.DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.emit(record.levelno, record.getMessage(), domain=RECIPE, component=record.funcName,
                           thread=record.thread)


class Stop(Exception):
    """Ends the command with an exit status (the messages were printed)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------- values

def esorex_double(value: float) -> str:
    """A double as EsoRex prints it: the shortest ``%.{p}g`` (p >= 3) that reads back, ``.0`` added
    when neither a point nor an exponent shows (30 -> 30.0, 5000 -> 5e+03)."""
    for precision in range(3, 18):
        text = f"{value:.{precision}g}"
        if float(text) == value:
            break
    return text if ("." in text or "e" in text or "n" in text) else text + ".0"


def shown(value: Any) -> str:
    """A value as EsoRex shows it in --help, --params and rc files."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        return esorex_double(value)
    return str(value)


def _bool(text: str) -> bool | None:
    return {"TRUE": True, "true": True, "FALSE": False, "false": False}.get(text)


_INT_PREFIX = re.compile(r"^\s*[+-]?\d+")
_FLOAT_PREFIX = re.compile(r"^\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)", re.I)


def recipe_value(parameter: Parameter, text: str) -> Any:
    """A recipe option's text as CPL's command-line parsing takes it (numbers by their C prefix)."""
    if parameter.type is bool:
        value = _bool(text)
        if value is None:
            raise ValueError("Type mismatch")
        return value
    if parameter.type is int:
        match = _INT_PREFIX.match(text)
        if not match:
            raise ValueError("Type mismatch")
        return int(match[0])
    if parameter.type is float:
        match = _FLOAT_PREFIX.match(text)
        if not match:
            raise ValueError("Type mismatch")
        return float(match[0])
    if parameter.choices and text not in parameter.alternatives:
        raise ValueError("Input data do not match")
    return text


# --------------------------------------------------------------------------- command line

def _match(name: str, names: Sequence[str]) -> str | None:
    """getopt_long_only's choice: the exact name, else the only name it abbreviates."""
    if name in names:
        return name
    candidates = [n for n in names if n.startswith(name)]
    return candidates[0] if len(candidates) == 1 and name else None


def split_option(token: str) -> tuple[str, str | None]:
    """``--name=value`` / ``-name`` -> (name, value or None without '=')."""
    body = token[2:] if token.startswith("--") else token[1:]
    name, sep, value = body.partition("=")
    return name, (value if sep else None)


def is_option(token: str) -> bool:
    return token.startswith("-") and token != "-"


def recipe_name(argv: Sequence[str]) -> str | None:
    """The recipe of an EsoRex command line: its first word that is not an option."""
    return next((token for token in argv if not is_option(token)), None)


@dataclass
class CommandLine:
    """Pass 1 of EsoRex's parsing: global options given, the recipe, and what follows it."""

    given: dict[str, Any]
    recipe: str | None
    rest: list[str]


def parse_globals(argv: Sequence[str], messages: Messages) -> CommandLine:
    """EsoRex's first pass: global options up to the recipe name (``Stop`` on an error)."""
    given: dict[str, Any] = {}
    names = [o.name for o in OPTIONS]
    for position, token in enumerate(argv):
        if not is_option(token):
            return CommandLine(given, token, list(argv[position + 1:]))
        name, value = split_option(token)
        if name.startswith(CALLER + "."):
            name = name[len(CALLER) + 1:]
        found = _match(name, names)
        if found is None:
            messages.error(f"Command line parameter '{token}' not recognized", stamp=False)
            messages.error("Unable to continue parsing command line options", stamp=False)
            raise Stop(EXIT_FAILED)
        given[found] = option_value(BY_NAME[found], value, messages)
    return CommandLine(given, None, [])


def option_value(option: GlobalOption, value: str | None, messages: Messages, stamp: bool = False) -> Any:
    """The value of a global option as given (``Stop`` on a value EsoRex refuses)."""
    if value is None:
        return True if option.type is bool else ("TRUE" if option.name == "create-config" else "")
    if value == "":
        messages.error(f"'--{option.name}' needs an argument but none was specified after the equals sign (\"=\").",
                       stamp=stamp)
        raise Stop(EXIT_FAILED)
    if option.type is bool:
        parsed = _bool(value)
        if parsed is None:
            _type_error(option.name, "Type mismatch", messages, stamp)
        return parsed
    if option.choices and value not in option.choices:
        _type_error(option.name, "Input data do not match", messages, stamp)
    return value


def _type_error(name: str, what: str, messages: Messages, stamp: bool) -> None:
    messages.error(f"CPL error '{what}' occurred during the processing of the option '--{name}'", stamp=stamp)
    messages.warning("Check that the supplied value is of a suitable type for the parameter (e.g. enum, string, "
                     "boolean, etc.) and is within any required range.", stamp=stamp)
    raise Stop(EXIT_FAILED)


def read_rc(path: Path) -> list[tuple[int, str, str]]:
    """``(line, key, value)`` of an EsoRex rc file (``#`` in column 1 and empty lines skipped,
    blanks around ``=`` and ``"`` quotes removed); a line that is not ``key=value`` has key ''."""
    entries = []
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        entries.append((number, key.strip() if sep else "", value.replace("\\", "") if sep else line))
    return entries


def caller_settings(line: CommandLine, environ: Mapping[str, str], messages: Messages) -> dict[str, Any]:
    """The global options in force: built-in < ~/.esorex/esorex.rc (else /etc/esorex.rc) <
    --config / ESOREX_CONFIG < ESOREX_* < command line."""
    values = {o.name: o.default for o in OPTIONS}
    home_rc = Path(environ.get("HOME", "~")).expanduser() / ".esorex" / "esorex.rc"
    for rc in ([home_rc] if home_rc.is_file() else [SYSTEM_CONFIG] if SYSTEM_CONFIG.is_file() else []):
        _apply_caller_rc(rc, values, messages)
    config = line.given.get("config") or environ.get("ESOREX_CONFIG", "")
    if config:
        if not Path(config).is_file():
            messages.error(f"'--config={config}' was specified, but the file '{config}' could not be found.",
                           stamp=False)
            raise Stop(EXIT_FAILED)
        _apply_caller_rc(Path(config), values, messages)
    for option in OPTIONS:
        if option.env and option.env in environ and option.name != "config":
            values[option.name] = option_value(option, environ[option.env], messages)
    values.update(line.given)
    values["config"] = config
    return values


def _apply_caller_rc(path: Path, values: dict[str, Any], messages: Messages) -> None:
    for _, key, value in read_rc(path):
        name = key[len(CALLER) + 1:] if key.startswith(CALLER + ".") else None
        option = BY_NAME.get(name or "")
        if option is None:
            messages.error(f"Parameter '{key}' not recognised in configuration file '{path}'", stamp=False)
            messages.error(f"Unable to continue parsing configuration file '{path}'", stamp=False)
            continue
        if not option.in_config:
            messages.warning(f"Parameter '{key}' should not appear in a configuration file, but is present in "
                             f"'{path}'", stamp=False)
            continue
        try:
            values[option.name] = option_value(option, value, messages)
        except Stop:
            messages.error(f"Error parsing/interpreting entry '{key}' in configuration file '{path}'", stamp=False)
            raise


def recipe_settings(rest: Sequence[str], caller: Mapping[str, Any], environ: Mapping[str, str],
                    messages: Messages) -> tuple[dict[str, Any], list[str]]:
    """Pass 2: parameter values (default < ~/.esorex/muse_twilight.rc < --recipe-config <
    command line) and the SOF files."""
    values: dict[str, Any] = {}
    home_rc = Path(environ.get("HOME", "~")).expanduser() / ".esorex" / f"{RECIPE}.rc"
    rcs = [home_rc] if home_rc.is_file() else []
    recipe_config = caller["recipe-config"]
    if recipe_config:
        if not Path(recipe_config).is_file():
            messages.error(f"'--recipe-config={recipe_config}' was specified, but the file '{recipe_config}' "
                           "could not be found.")
            raise Stop(EXIT_FAILED)
        rcs.append(Path(recipe_config))
    for rc in rcs:
        values.update(_recipe_rc(rc, messages))
    names = [p.name for p in PARAMETERS]
    sofs = []
    for token in rest:
        if not is_option(token):
            sofs.append(token)
            continue
        name, value = split_option(token)
        if name.startswith(CONTEXT + "."):
            name = name[len(CONTEXT) + 1:]
        found = _match(name, names)
        if found is None:
            messages.error(f"Command line parameter '{token}' not recognized")
            messages.error("Unable to continue parsing command line options")
            raise Stop(EXIT_FAILED)
        parameter = lookup(found)
        if value is None and parameter.type is not bool:
            if parameter.type is str:
                values[found] = ""
            else:
                messages.error(f"'--{found}' needs an argument but none was specified...")
            continue
        if value == "":
            messages.error(f"'--{found}' needs an argument but none was specified after the equals sign (\"=\").")
            messages.error(f"'' during processing of '{found}'")
            raise Stop(EXIT_FAILED)
        try:
            values[found] = True if value is None else recipe_value(parameter, value)
        except ValueError as err:
            _type_error(found, str(err), messages, stamp=True)
    return values, sofs


def _recipe_rc(path: Path, messages: Messages) -> dict[str, Any]:
    for _, key, value in read_rc(path):
        if not key:
            messages.error(f"'{value}' does not fit 'key=value' format in configuration file '{path}'")
            raise Stop(EXIT_BAD_RC_LINE)
        if not key.startswith(CONTEXT + ".") or key[len(CONTEXT) + 1:] not in {p.name for p in PARAMETERS}:
            messages.error(f"Parameter '{key}' not recognised in configuration file '{path}'")
            messages.error(f"Unable to continue parsing configuration file '{path}'")
            raise Stop(EXIT_BAD_RC_KEY)
    try:
        return read_config(str(path))
    except MuseTwilightError as err:
        messages.error(f"Error parsing/interpreting configuration file '{path}': {err}")
        raise Stop(EXIT_FAILED) from None


# --------------------------------------------------------------------------- texts

def _wrap(first: str, indent: str, text: str, later: int = 79) -> str:
    """Words wrapped as EsoRex wraps them: 80 columns on the first line, ``later`` on the others."""
    lines: list[str] = []
    current = first
    for word in text.split(" "):  # a double space stays, as in EsoRex's texts
        if len(current) + 1 + len(word) > (80 if not lines else later) and current.strip():
            lines.append(current)
            current = indent
        current += " " + word
    return "\n".join([*lines, current])


def _entry(name: str, text: str) -> str:
    """One option of a help text."""
    return _wrap(f"  --{name:<20}:", " " * 25, text)


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."


def help_text(values: Mapping[str, Any]) -> str:
    """``esorex --help``: EsoRex's options with their values in force."""
    lines = ["Usage: esorex [esorex-options] recipe [recipe-options] sof", "", "Options:", ""]
    for option in OPTIONS:
        text = option.help
        if option.env:
            text += f" This option may also be set using the environment variable {option.env}."
        if option.choices:
            text += f" <{' | '.join(option.choices)}>"
        lines.append(_entry(option.name, f"{text} [{shown(values[option.name])}]"))
    return "\n".join(lines) + "\n\n"


def recipe_help_text(values: Mapping[str, Any], show_hidden: bool) -> str:
    """``esorex --help muse_twilight``."""
    from .manpage import SYNOPSIS

    head = textwrap.fill(f"Recipe: {RECIPE} -- {SYNOPSIS}", width=80, subsequent_indent="  ")
    lines = [head, "", f"Usage: esorex [esorex-options] {RECIPE} [{RECIPE}-options] sof", "", "Options:", ""]
    for parameter in PARAMETERS:
        if parameter.expert and not show_hidden:
            continue
        allowed = f" <{' | '.join(parameter.alternatives)}>" if parameter.choices else ""
        lines.append(_entry(parameter.name, f"{_sentence(parameter.help)}{allowed} [{shown(values[parameter.name])}]"))
    lines += ["", "For help on the options of esorex itself, please use the command 'esorex --help'",
              "(that is, without specifying any recipe name). For more information about the",
              f"recipe, one can also use the command 'esorex --man-page {RECIPE}'."]
    return "\n".join(lines) + "\n"


def params_text(caller: Mapping[str, Any], recipe: Mapping[str, Any] | None) -> str:
    """``esorex --params [muse_twilight]``."""
    lines = ["Caller Parameters :", ""] + [f"  {o.name:<22}: {shown(caller[o.name])}" for o in OPTIONS] + [""]
    if recipe is not None:
        lines += ["Recipe Parameters :", ""] + [f"  {p.name:<22}: {shown(recipe[p.name])}" for p in PARAMETERS]
        lines.append("")
    return "\n".join(lines) + "\n"


def config_file_text(path: str, entries: Sequence[tuple[str, str, str]]) -> str:
    """An rc file in EsoRex's layout from ``(option, help, 'fullname=value')`` entries."""
    head = [f"# File: {path}", "#", "# Note: This configuration file has been automatically",
            f"#       generated by the esorex (v{ESOREX_VERSION}) program.", "#",
            f"# Date: {datetime.now().strftime('%d-%b-%Y %H:%M:%S')}", "#", "#", ""]
    blocks = []
    for name, text, line in entries:
        comment = _wrap("#", "#", text, later=78)
        blocks.append(f"# --{name}\n{comment}\n{line}\n")
    return "\n".join(head) + "\n" + "\n".join(blocks) + "\n#\n# End of file\n"


def recipe_config_entries(values: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    entries = []
    for parameter in PARAMETERS:
        allowed = f" <{' | '.join(parameter.alternatives)}>" if parameter.choices else ""
        value = shown(values[parameter.name])
        entries.append((parameter.name, _sentence(parameter.help) + allowed,
                        f"{parameter.fullname}={value}"))
    return entries


def config_json(values: Mapping[str, Any], recipe: bool) -> str:
    """``--create-config=x.json``: one object per parameter, keys in EsoRex's order."""
    objects = []
    declared = PARAMETERS if recipe else tuple(o for o in OPTIONS if o.in_config)
    for item in declared:
        value = values[item.name]
        valtype = {bool: "bool", int: "int", float: "double", str: "string"}[item.type]
        choices = item.alternatives if recipe else item.choices  # type: ignore[union-attr]
        fields = [("name", json.dumps(item.fullname)),
                  ("value", "true" if value is True else "false" if value is False else
                   f"{value:.17g}" if isinstance(value, float) and not value.is_integer() else
                   str(int(value)) if isinstance(value, (int, float)) else json.dumps(str(value))),
                  ("valtype", json.dumps(valtype)), ("partype", json.dumps("enum" if choices else "value"))]
        if choices:
            fields.append(("valenum", "[ " + " , ".join(json.dumps(c) for c in choices) + " ]"))
        fields += [("display_name", json.dumps(item.name)), ("description", json.dumps(item.help))]
        if recipe:
            fields.append(("recipe", json.dumps(RECIPE)))
        objects.append("  {\n" + ",\n".join(f'    "{k}": {v.replace("/", chr(92) + "/")}' for k, v in fields)
                       + "\n  }")
    return "[\n" + ",\n".join(objects) + "\n]\n"


def create_config(target: str, values: Mapping[str, Any], recipe: bool, environ: Mapping[str, str],
                  messages: Messages) -> None:
    """Write the configuration file ``--create-config`` asks for (backing up an old one)."""
    if target in ("TRUE", "true"):
        directory = Path(environ.get("HOME", "~")).expanduser() / ".esorex"
        if not directory.is_dir():
            messages.warning(f"No global configuration directory exists. Creating global configuration directory "
                             f"'{directory}'", stamp=recipe)
            directory.mkdir(parents=True)
        target = str(directory / (f"{RECIPE}.rc" if recipe else "esorex.rc"))
    path = Path(target)
    if path.exists():
        shutil.copyfile(path, f"{target}.bak")
        messages.info(f"Old configuration file copied to '{target}.bak'", stamp=recipe)
    messages.info(f"Creating configuration file '{target}'", stamp=recipe)
    if target.endswith(".json"):
        messages.info("Writing configuration file in JSON format", stamp=recipe)
        path.write_text(config_json(values, recipe))
        return
    if recipe:
        entries = recipe_config_entries(values)
    else:
        entries = []
        for option in OPTIONS:
            if not option.in_config:
                continue
            value = shown(values[option.name])
            line = f"{option.fullname}={value}"
            if value == "":
                messages.warning(f"No sensible default available for '--{option.name}'. The entry will be inserted "
                                 "into the configuration file, but will be commented out.", stamp=False)
                line = "#" + line
            text = option.help + (f" This option may also be set using the environment variable {option.env}."
                                  if option.env else "")
            text += f" <{' | '.join(option.choices)}>" if option.choices else ""
            entries.append((option.name, text, line))
    path.write_text(config_file_text(target, entries))


# --------------------------------------------------------------------------- the run

def formed_dir(output_dir: str, cwd: str) -> str:
    """The product directory as EsoRex writes it into its messages and products SOF."""
    text = output_dir[:-1] if output_dir.endswith("/") and len(output_dir) > 1 else output_dir
    if text == ".":
        return cwd
    if text.startswith("./"):
        return f"{cwd}/{text[2:]}"
    if text.startswith("."):
        return f"{cwd}/{text}"
    return text


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def _forwarding(messages: Messages) -> Iterator[None]:
    logger = logging.getLogger("musetwilight")
    handler = _Forward(messages)
    previous, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        logger.propagate = propagate


def run_recipe(caller: Mapping[str, Any], values: Mapping[str, Any], sofs: Sequence[str],
               environ: Mapping[str, str], messages: Messages) -> int:
    """Reduce the set and write, move, link and list the products as EsoRex does."""
    from .. import recipe
    from ..io import products
    from ..io.frames import InputError, parse_sof

    for name in ("paf-config", "recipe-dir", "unload-plugin"):
        if caller[name] != BY_NAME[name].default:
            messages.debug(f"option --{name}={shown(caller[name])} has no meaning for musetwilight's {RECIPE}: "
                           "ignored")
    if caller["unload-plugin"] is False:
        messages.warning("unloading of plugins is inhibited by program option 'unload-plugin'!")
    missing = [s for s in sofs if not Path(s).is_file()]
    if missing:
        messages.error(f"Unable to open SOF file '{missing[0]}'")
        messages.error(f"Problem occurred loading frameset from the SOF file '{missing[0]}'.\nIf you want to ignore "
                       "errors of missing files in the sof, set '--check-sof-exist=false'.")
        return EXIT_FILE_NOT_FOUND
    if caller["create-config"] not in ("FALSE", "false"):
        create_config(caller["create-config"], {**_recipe_defaults(), **_texts(values)}, True, environ, messages)
        return 0
    messages.info(f"musetwilight {__version__}: {RECIPE} of the MUSE Instrument Pipeline v2.8.7 in Python",
                  domain=RECIPE, tid=False)
    messages.recipe_started = True
    with _forwarding(messages):
        try:
            frames = parse_sof(sofs, unknown_tags="ignore") if sofs else None
        except InputError as err:
            frames = None
            messages.error(str(err), domain=RECIPE)
        if frames is None:
            messages.error("No valid raw tag(s) found!", domain=RECIPE)
            return _failed(caller, messages)
        if caller["check-sof-exist"]:
            absent = [f for f in frames if not f.path.is_file()]
            for frame in absent:
                messages.error(f"Could not open the input file '{frame.path}' with tag '{frame.tag}' and no group "
                               f"in the SOF '{', '.join(sofs)}'")
            if absent:
                messages.error(f"Problem occurred loading frameset from the SOF file '{sofs[0]}'.\nIf you want to "
                               "ignore errors of missing files in the sof, set '--check-sof-exist=false'.")
                return EXIT_FILE_NOT_FOUND
        start = time.perf_counter()
        try:
            settings = make_settings(values)
            result = recipe.run(frames, settings, None, environ=environ,
                                progress=lambda text: messages.debug(text, domain=RECIPE, component="progress"))
            out = caller["output-dir"]
            prefix = None if caller["suppress-prefix"] else caller["output-prefix"]
            made = result.hdulists()
            names = products.product_file_names(made, prefix)
            cwd = os.getcwd()
            in_place = _same_dir(out, cwd) and prefix is None
            shown_dir = None if in_place else formed_dir(out, cwd)
            if not (caller["no-checksum"] and caller["no-datamd5"]):
                messages.info("Calculating product checksums")
            existing = {tag for tag in made if not in_place and (Path(out) / names[tag]).exists()}
            sof_out = caller["products-sof"] or None
            options = products.WriteOptions(checksum=not caller["no-checksum"], datamd5=not caller["no-datamd5"],
                                            prefix=prefix, readonly=caller["output-readonly"],
                                            products_sof=Path(sof_out) if sof_out else None, listed_dir=shown_dir,
                                            record=False)  # EsoRex writes the products only
            products.write_products(made, out, options)
        except (MuseTwilightError, OSError) as err:
            messages.error(str(err), domain=RECIPE)
            return _failed(caller, messages)
    elapsed = time.perf_counter() - start
    for tag in made:
        formed = names[tag] if shown_dir is None else f"{shown_dir}/{names[tag]}"
        if tag in existing:
            messages.warning(f"Product final output path file already exists and will be overwritten ({formed})")
        messages.info(f"Created product {formed}{' (in place)' if in_place else ''}")
        if not caller["suppress-link"]:
            link = Path(caller["link-dir"]) / names[tag]
            with contextlib.suppress(OSError):
                link.unlink(missing_ok=True)
                link.symlink_to(formed)
    messages.info(f"{len(made)} products created")
    if caller["time"]:
        _timing(frames, elapsed, messages)
    return 0


def _texts(values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed parameter values (from rc files) as the plain values EsoRex shows."""
    return {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in values.items()}


def _recipe_defaults() -> dict[str, Any]:
    return {p.name: p.default for p in PARAMETERS}


def _failed(caller: Mapping[str, Any], messages: Messages) -> int:
    messages.error(f"Execution of recipe '{RECIPE}' failed, status = -1")
    if caller["products-sof"]:
        messages.warning("Writing of output sof omitted due to previous errors")
    return EXIT_FAILED


def _timing(frames, elapsed: float, messages: Messages) -> None:
    raw = sorted({str(f.path) for f in frames if f.group == "raw"})
    size = sum(os.path.getsize(p) for p in raw if os.path.isfile(p)) / MEGABYTE
    messages.info(f"Recipe operation(s) took {elapsed:14.3g} seconds to complete.")
    if len(raw) == 1:
        messages.info(f"Size of single raw input frame  = {size:8.2f} MB\n")
    else:
        messages.info(f"Total size of {len(raw)} raw input frames  = {size:8.2f} MB\n")
    messages.info(f"=> processing rate of {size / max(elapsed, 1e-9):8.2f} MB/sec \n")


# --------------------------------------------------------------------------- the real esorex

def real_esorex(environ: Mapping[str, str]) -> str | None:
    """ESO's esorex: MUSETWILIGHT_ESOREX, else the first ``esorex`` on PATH that is not this program."""
    if environ.get(_DELEGATED_ENV):
        return None
    explicit = environ.get(REAL_ESOREX_ENV)
    if explicit:
        return explicit
    ours = {os.path.realpath(sys.argv[0]), os.path.realpath(__file__)}
    for directory in environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory or ".", "esorex")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK) and os.path.realpath(candidate) not in ours:
            with open(candidate, "rb") as handle:
                if b"musetwilight" in handle.read(4096):
                    continue
            return candidate
    return None


def delegate(argv: Sequence[str], environ: Mapping[str, str], messages: Messages, name: str) -> int:
    """Hand the whole command line to the real esorex (no return), or give esorex's error."""
    exe = real_esorex(environ)
    if exe is None:
        messages.stdout.write(BANNER)
        messages.error(f"Unable to find recipe '{name}'. Check that the recipe is in the path specified by the "
                       "'--recipe-dir' option.", stamp=False)
        return EXIT_NO_RECIPE
    messages.stdout.flush()
    os.execve(exe, [exe, *argv], {**environ, _DELEGATED_ENV: "1"})
    return EXIT_FAILED  # pragma: no cover - execve does not return


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         stdout=None, stderr=None) -> int:
    """Run one EsoRex command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    messages = Messages(stdout, stderr)
    name = recipe_name(argv)
    if name is not None and name != RECIPE:
        return delegate(argv, environ, messages, name)
    started = datetime.now()
    messages.stdout.write(BANNER)
    try:
        line = parse_globals(argv, messages)
        caller = caller_settings(line, environ, messages)
        messages.msg_level, messages.log_level = LEVELS[caller["msg-level"]], LEVELS[caller["log-level"]]
        messages.components = caller["msg-level"] == "debug"
        _check_dirs(caller, messages)
    except Stop as stop:
        messages.stdout.write(f"Libraries used: {LIBRARIES}\n\n")
        return stop.status
    if name is None:
        return _without_recipe(caller, environ, messages)
    log_path = Path(caller["log-dir"]) / caller["log-file"]
    for text in (f"This is EsoRex, version {ESOREX_VERSION} (musetwilight-esorex)", f"using the libraries: {LIBRARIES}",
                 "Invocation command line was: esorex " + " ".join(argv)):
        messages.log_lines.append(f"{started.strftime('%H:%M:%S')} [ INFO  ] : [tid=000] {text}")
    try:
        status = _with_recipe(line, caller, environ, messages)
    except Stop as stop:
        status = stop.status
    if caller["mem-check"]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        messages.stderr.write(f"#----- Memory Diagnostics -----\nPeak resident memory (kB): {peak}\n"
                              "#----- Memory Currently Allocated -----\nNumber of active pointers:    0\n")
    if caller["log-level"] != "off":
        with contextlib.suppress(OSError):
            messages.write_log(log_path, started)
    return status


def _check_dirs(caller: Mapping[str, Any], messages: Messages) -> None:
    if caller["output-dir"] == "":
        messages.error("No destination given for program output (use the option '--output-dir').", stamp=False)
        raise Stop(EXIT_FAILED)
    if not Path(caller["output-dir"]).is_dir():
        messages.error(f"The argument to '--output-dir' [{caller['output-dir']}] is not a valid directory",
                       stamp=False)
        raise Stop(EXIT_FAILED)
    if not Path(caller["log-dir"] or ".").is_dir():
        messages.error(f"'--log-dir={caller['log-dir']}' specified, but '{caller['log-dir']}' is not a valid "
                       "directory.", stamp=False)
        raise Stop(EXIT_FAILED)


def _without_recipe(caller: Mapping[str, Any], environ: Mapping[str, str], messages: Messages) -> int:
    out = messages.stdout
    if caller["help"]:
        out.write(help_text(caller) + f"\nLibraries used: {LIBRARIES}\n\n")
    elif caller["version"]:
        out.write(f"Libraries used: {LIBRARIES}\n\nmusetwilight-esorex: the EsoRex {ESOREX_VERSION} command line "
                  f"for musetwilight's {RECIPE}; other recipes go to ESO's esorex.\n\n")
    elif caller["create-config"] not in ("FALSE", "false"):
        create_config(caller["create-config"], caller, False, environ, messages)
    elif caller["params"]:
        out.write(params_text(caller, None))
    elif caller["recipes"]:
        from .manpage import SYNOPSIS

        out.write("List of Available Recipes :\n\n" + textwrap.fill(
            f"  {RECIPE}  : {SYNOPSIS}", width=80, subsequent_indent=" " * (len(RECIPE) + 6)) + "\n\n")
    else:
        out.write(f"Libraries used: {LIBRARIES}\n\n")
    return 0


def _with_recipe(line: CommandLine, caller: Mapping[str, Any], environ: Mapping[str, str],
                 messages: Messages) -> int:
    values, sofs = recipe_settings(line.rest, caller, environ, messages)
    current = {**_recipe_defaults(), **_texts(values)}
    if caller["help"]:
        messages.stdout.write(recipe_help_text(current, caller["show-hidden"]))
        return 0
    if caller["man-page"]:
        from .manpage import render

        messages.stdout.write(render(show_hidden=caller["show-hidden"],
                                     synopsis=f"esorex [esorex-options] {RECIPE} [{RECIPE}-options] sof") + "\n")
        return 0
    if caller["params"]:
        messages.stdout.write(params_text(caller, current))
        return 0
    return run_recipe(caller, values, sofs, environ, messages)


def entry_point() -> None:
    """The console script ``musetwilight-esorex``."""
    sys.exit(main())


