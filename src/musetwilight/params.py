"""The 24 muse_twilight recipe parameters, declared once, and their typed values.

Every other part of the package (command line, EsoRex config files, the python-cpl
facade, the man page, product headers) reads the table ``PARAMETERS``.  Names, types,
defaults, allowed values and help texts are those of ESO's muse_twilight 2.8.7.

Each declaration also turns the text a user gives into the typed value the stages
use, once, when :func:`make_settings` builds the :class:`Settings`: the compound
strings of ``overscan`` and ``ovscreject`` become :class:`OverscanSpec` and
:class:`RejectSpec`, the choices become enumerations (:class:`Combine`,
:class:`Resample`, :class:`CrType`, :class:`VignSmooth`).  No stage re-parses a
parameter; ``str()`` of a typed value is the text as given (what ESO records).
"""

from __future__ import annotations

import builtins
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from .errors import ParameterError

RECIPE = "muse_twilight"
CONTEXT = "muse.muse_twilight"


# --------------------------------------------------------------------------- typed values

class Combine(StrEnum):
    """Combination of the exposures of one IFU."""

    AVERAGE = "average"
    MEDIAN = "median"
    MINMAX = "minmax"
    SIGCLIP = "sigclip"


class Resample(StrEnum):
    """Cube resampling kernel; ``code`` is the number the kernels use."""

    NEAREST = "nearest"
    LINEAR = "linear"
    QUADRATIC = "quadratic"
    RENKA = "renka"
    DRIZZLE = "drizzle"
    LANCZOS = "lanczos"

    @property
    def code(self) -> int:
        return list(Resample).index(self)


class CrType(StrEnum):
    """Statistics of the cosmic-ray rejection in the resampling; ``code`` for the kernels."""

    IRAF = "iraf"
    MEAN = "mean"
    MEDIAN = "median"

    @property
    def code(self) -> int:
        return list(CrType).index(self)


class VignSmooth(StrEnum):
    """Smoothing of the vignetted area of TWILIGHT_CUBE."""

    POLYFIT = "polyfit"
    GAUSSIAN = "gaussian"
    MEDIAN = "median"


class IllumModel(StrEnum):
    """The model of TWILIGHT_CUBE: musetwilight's own option, not one of ESO's 24 parameters
    (so it is in no product header's parameter list, EsoRex config or python-cpl parameter).

    ``eso`` (the default) is ESO's model, bit for bit (:func:`musetwilight.core.smooth.postprocess`);
    ``joint`` is one fit of the whole cube (:mod:`musetwilight.core.illumination`).  Chosen
    with ``--illum-model`` (musetwilight run, demo, batch), ``illum_model=`` of
    :func:`musetwilight.recipe.run` or $MUSETWILIGHT_ILLUM_MODEL (also for musetwilight-esorex
    and the python-cpl facade).
    """

    ESO = "eso"
    JOINT = "joint"

    @classmethod
    def parse(cls, value: str | IllumModel | None, source: str = "illum model") -> IllumModel:
        """The model named by ``value`` (any case, surrounding blanks ignored; None: ``eso``);
        ParameterError naming ``source`` and the choices otherwise."""
        if value is None:
            return cls.ESO
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower()
        try:
            return cls(text)
        except ValueError:
            raise ParameterError(f"{source}: {str(value)!r} is not a TWILIGHT_CUBE model (choose one of "
                                 f"{', '.join(m.value for m in cls)})") from None


_UNSIGNED = re.compile(r"^[0-9]+$")


def _number(text: str, what: str, source: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ParameterError(f"{source}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ParameterError(f"{source}: {what} {text!r} is not a finite number")
    return value


def _unsigned(text: str, what: str, source: str, maximum: int | None = None) -> int:
    if not _UNSIGNED.match(text):
        raise ParameterError(f"{source}: {what} {text!r} is not a non-negative integer")
    value = int(text)
    if maximum is not None and value > maximum:
        raise ParameterError(f"{source}: {what} {value} is larger than {maximum}")
    return value


def _arguments(text: str, method: str, most: int, source: str) -> list[str]:
    """The comma-separated words after ``method:`` (none without a colon)."""
    if text == method:
        return []
    if not text.startswith(method + ":"):
        raise ParameterError(f"{source}: {text!r} is not valid")
    words = text[len(method) + 1:].split(",")
    if len(words) > most or any(not w.strip() for w in words):
        raise ParameterError(f"{source}: {text!r} takes 1 to {most} comma-separated values after "
                             f"'{method}:'")
    return [w.strip() for w in words]


@dataclass(frozen=True)
class OverscanSpec:
    """``overscan``: ``none``, ``offset`` or ``vpoly[:order[,frms[,fchisq]]]``.

    For vpoly the polynomial order grows up to ``order`` (default 15) until the RMS
    and the reduced chi-square improve by less than the factors ``frms`` and
    ``fchisq`` (both > 1, default 1.00001).
    """

    method: str
    order: int = 15
    frms: float = 1.00001
    fchisq: float = 1.00001
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.method

    @classmethod
    def parse(cls, text: str) -> OverscanSpec:
        """Parse the parameter text; raise ParameterError naming what is wrong."""
        source = "parameter overscan"
        if text in ("none", "offset"):
            return cls(text, text=text)
        if text != "vpoly" and not text.startswith("vpoly:"):
            raise ParameterError(f"{source}: {text!r} is not valid (none, offset or "
                                 "vpoly[:order[,frms[,fchisq]]])")
        args = _arguments(text, "vpoly", 3, source)
        order = _unsigned(args[0], "vpoly order", source, 255) if args else 15
        frms = _number(args[1], "vpoly frms", source) if len(args) > 1 else 1.00001
        fchisq = _number(args[2], "vpoly fchisq", source) if len(args) > 2 else 1.00001
        if not (frms > 1 and fchisq > 1):
            raise ParameterError(f"{source}: {text!r}: frms and fchisq must be larger than 1")
        return cls("vpoly", order, frms, fchisq, text)


@dataclass(frozen=True)
class RejectSpec:
    """``ovscreject``: ``none``, ``dcr[:xbox[,ybox[,npass[,threshold]]]]`` or ``fit[:sigma]``.

    DCR (Pych 2004) flags cosmic rays in the overscans in boxes of xbox x ybox
    (default 128 x 32, transposed for the vertical overscan) over ``npass`` passes at
    ``threshold`` sigma; ``fit`` rejects at ``sigma`` x RMS of an iterative constant
    fit.  Thresholds are single precision, as ESO reads them (``strtof``).
    """

    method: str
    xbox: int = 128
    ybox: int = 32
    npass: int = 3
    threshold: float = 2.5
    sigma: float = 5.0
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.method

    @classmethod
    def parse(cls, text: str) -> RejectSpec:
        """Parse the parameter text; raise ParameterError naming what is wrong."""
        source = "parameter ovscreject"
        if text == "none":
            return cls("none", text=text)
        if text == "dcr" or text.startswith("dcr:"):
            args = _arguments(text, "dcr", 4, source)
            xbox = _unsigned(args[0], "dcr x box", source) if len(args) > 0 else 128
            ybox = _unsigned(args[1], "dcr y box", source) if len(args) > 1 else 32
            npass = _unsigned(args[2], "dcr passes", source) if len(args) > 2 else 3
            threshold = _number(args[3], "dcr threshold", source) if len(args) > 3 else 2.5
            return cls("dcr", xbox, ybox, npass, float(np.float32(threshold)), text=text)
        if text == "fit" or text.startswith("fit:"):
            args = _arguments(text, "fit", 1, source)
            sigma = _number(args[0], "fit sigma", source) if args else 5.0
            return cls("fit", sigma=float(np.float32(sigma)), text=text)
        raise ParameterError(f"{source}: {text!r} is not valid (none, dcr[:xbox,ybox,npass,threshold] "
                             "or fit[:sigma])")


# --------------------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Parameter:
    """Declaration of one recipe parameter.

    ``type`` is the EsoRex type of the text (bool, int, float, str); ``choices`` an
    enumeration of the allowed strings; ``parse`` turns the checked text into the
    typed value the stages receive.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: builtins.type[StrEnum] | None = None
    parse: Callable[[Any], Any] | None = None
    check: Callable[[Any], str | None] | None = None
    expert: bool = False

    @property
    def fullname(self) -> str:
        return f"{CONTEXT}.{self.name}"

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", float: "double", str: "string"}[self.type]

    @property
    def alternatives(self) -> tuple[str, ...]:
        """The allowed values of an enumeration parameter (empty for the others)."""
        return tuple(str(c) for c in self.choices) if self.choices else ()

    @property
    def default_value(self) -> Any:
        """The default as the typed value the stages receive."""
        return self.convert(self.default)

    def convert(self, value: Any) -> Any:
        """The typed value of ``value`` (text or a value of the parameter's type); raise ParameterError."""
        if isinstance(value, (OverscanSpec, RejectSpec)) or (self.choices and isinstance(value, self.choices)):
            value = str(value)
        converted = self._coerce(value)
        if self.choices is not None:
            if converted not in self.alternatives:
                raise ParameterError(f"parameter {self.name}: {value!r} is not one of "
                                     f"{', '.join(self.alternatives)}")
            return self.choices(converted)
        if self.check is not None:
            problem = self.check(converted)
            if problem:
                raise ParameterError(f"parameter {self.name}: {value!r} {problem}")
        return self.parse(converted) if self.parse is not None else converted

    def _coerce(self, value: Any) -> Any:
        t = self.type
        if t is bool:
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in ("true", "t", "1", "yes"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "f", "0", "no"):
                return False
            raise ParameterError(f"parameter {self.name}: {value!r} is not a boolean (TRUE or FALSE)")
        if t is int:
            if isinstance(value, (bool, np.bool_)):
                raise ParameterError(f"parameter {self.name}: {value!r} is not an integer")
            if isinstance(value, (int, np.integer)):
                return int(value)
            if isinstance(value, (float, np.floating)) and float(value).is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    pass
            raise ParameterError(f"parameter {self.name}: {value!r} is not an integer")
        if t is float:
            if isinstance(value, (bool, np.bool_)):
                raise ParameterError(f"parameter {self.name}: {value!r} is not a number")
            try:
                number = float(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                raise ParameterError(f"parameter {self.name}: {value!r} is not a number") from None
            if not math.isfinite(number):
                raise ParameterError(f"parameter {self.name}: {value!r} is not a finite number")
            return number
        if not isinstance(value, str):
            raise ParameterError(f"parameter {self.name}: {value!r} is not a string")
        return value.strip()


def _nonnegative(value: int) -> str | None:
    return "must not be negative" if value < 0 else None


def _positive(value: float) -> str | None:
    return "must be positive" if value <= 0 else None


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "overscan", str, "vpoly",
        'If this is "none", stop when detecting discrepant overscan levels (see ovscsigma), for '
        '"offset" it assumes that the mean overscan level represents the real offset in the bias '
        'levels of the exposures involved, and adjusts the data accordingly; for "vpoly", a '
        "polynomial is fit to the vertical overscan and subtracted from the whole quadrant.",
        parse=OverscanSpec.parse,
    ),
    Parameter(
        "ovscreject", str, "dcr",
        "This influences how values are rejected when computing overscan statistics. Either no "
        'rejection at all ("none"), rejection using the DCR algorithm ("dcr"), or rejection using '
        'an iterative constant fit ("fit").',
        parse=RejectSpec.parse,
    ),
    Parameter(
        "ovscsigma", float, 30.0,
        "If the deviation of mean overscan levels between a raw input image and the reference "
        "image is higher than |ovscsigma x stdev|, stop the processing. If overscan=\"vpoly\", this "
        "is used as sigma rejection level for the iterative polynomial fit (the level comparison "
        "is then done afterwards with |100 x stdev| to guard against incompatible settings). Has "
        'no effect for overscan="offset".',
    ),
    Parameter(
        "ovscignore", int, 3,
        "The number of pixels of the overscan adjacent to the data section of the CCD that are "
        "ignored when computing statistics or fits.",
        check=_nonnegative,
    ),
    Parameter("combine", str, "sigclip", "Type of combination to use", choices=Combine),
    Parameter("nlow", int, 1, "Number of minimum pixels to reject with minmax", check=_nonnegative),
    Parameter("nhigh", int, 1, "Number of maximum pixels to reject with minmax", check=_nonnegative),
    Parameter("nkeep", int, 1, "Number of pixels to keep with minmax", check=_nonnegative),
    Parameter("lsigma", float, 3.0, "Low sigma for pixel rejection with sigclip"),
    Parameter("hsigma", float, 3.0, "High sigma for pixel rejection with sigclip"),
    Parameter("scale", bool, False,
              "Scale the individual images to a common exposure time before combining them."),
    Parameter("resample", str, "drizzle", "The resampling technique to use for the final output cube.",
              choices=Resample),
    Parameter(
        "crtype", str, "median",
        'Type of statistics used for detection of cosmic rays during final resampling. "iraf" uses '
        'the variance information, "mean" uses standard (mean/stdev) statistics, "median" uses '
        "median and the median median of the absolute median deviation.",
        choices=CrType,
    ),
    Parameter(
        "crsigma", float, 50.0,
        "Sigma rejection factor to use for cosmic ray rejection during final resampling. A zero or "
        "negative value switches cosmic ray rejection off.",
    ),
    Parameter("lambdamin", float, 5000.0, "Minimum wavelength for twilight reconstruction."),
    Parameter("lambdamax", float, 9000.0, "Maximum wavelength for twilight reconstruction."),
    Parameter(
        "dlambda", float, 250.0,
        "Sampling for twilight reconstruction, this should result in planes of equal wavelength "
        "coverage.",
        check=_positive,
    ),
    Parameter("xorder", int, 2, "Polynomial order to use in x direction to fit the full field of view.",
              check=_nonnegative),
    Parameter("yorder", int, 2, "Polynomial order to use in y direction to fit the full field of view.",
              check=_nonnegative),
    Parameter(
        "vignmaskedges", float, 0.02,
        "Pixels on edges stronger than this fraction in the normalized image are excluded from "
        "the fit to the vignetted area. Set to non-positive number to include them in the fit. "
        "This has no effect for NFM skyflats.",
        expert=True,
    ),
    Parameter(
        "vignsmooth", str, "polyfit",
        "Type of smoothing to use for the vignetted region given by the VIGNETTING_MASK (for WFM, "
        "or the internal mask, for NFM); gaussian uses (vignxpar + vignypar)/2 as FWHM.",
        choices=VignSmooth, expert=True,
    ),
    Parameter(
        "vignxpar", int, -1,
        "Parameter used by the vignetting smoothing: x order for polyfit (default, recommended 4), "
        "parameter that influences the FWHM for the gaussian (recommended: 10), or x dimension of "
        "median filter (recommended 5). If a negative value is found, the default is taken.",
        expert=True,
    ),
    Parameter(
        "vignypar", int, -1,
        "Parameter used by the vignetting smoothing: y order for polyfit (default, recommended 4), "
        "parameter that influences the FWHM for the gaussian (recommended: 10), or y dimension of "
        "median filter (recommended 5). If a negative value is found, the default is taken.",
        expert=True,
    ),
    Parameter(
        "vignnfmmask", int, 22,
        "The height of the vignetted region at the top of the MUSE field in NFM. This is the "
        "region modeled separately (the final vignetting model might be smaller).",
        expert=True,
    ),
)

BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}


def lookup(name: str) -> Parameter:
    """Find a parameter by short (``xorder``) or full (``muse.muse_twilight.xorder``) name."""
    short = name[len(CONTEXT) + 1:] if name.startswith(CONTEXT + ".") else name
    try:
        return BY_NAME[short]
    except KeyError:
        raise ParameterError(f"unknown parameter {name!r} of {RECIPE}") from None


@dataclass(frozen=True)
class Settings(Mapping[str, Any]):
    """A complete, validated set of typed recipe parameter values (read-only mapping).

    Attribute access gives the typed value (``settings.overscan.order``,
    ``settings.resample is Resample.DRIZZLE``).
    """

    typed: dict[str, Any] = field(default_factory=lambda: {p.name: p.default_value for p in PARAMETERS})

    def __post_init__(self) -> None:
        problems = cross_check(self.typed)
        if problems:
            raise ParameterError("; ".join(problems))

    def __getitem__(self, key: str) -> Any:
        return self.typed[lookup(key).name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.typed)

    def __len__(self) -> int:
        return len(self.typed)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.typed[key]
        except KeyError:
            raise AttributeError(key) from None

    def __reduce__(self):
        return make_settings, (self.texts(),)

    def replace(self, **changes: Any) -> Settings:
        return make_settings({**self.typed, **changes})

    def texts(self) -> dict[str, Any]:
        """The values as EsoRex would print them (compound and enumeration values as text)."""
        return {k: str(v) if isinstance(v, (str, OverscanSpec, RejectSpec)) else v for k, v in self.typed.items()}

    def non_default(self) -> dict[str, Any]:
        return {k: v for k, v in self.texts().items() if v != BY_NAME[k].default}


def cross_check(values: Mapping[str, Any]) -> list[str]:
    """Problems between parameters that are each valid on their own."""
    problems = []
    if values["lambdamax"] <= values["lambdamin"]:
        problems.append(
            f"lambdamax ({values['lambdamax']}) must be larger than lambdamin ({values['lambdamin']})"
        )
    return problems


def make_settings(values: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> Settings:
    """Validated, typed settings: the defaults, overridden by ``values`` (short or full names).

    Examples
    --------
    >>> settings = make_settings({"overscan": "vpoly:10", "resample": "nearest"})
    >>> settings.overscan.order, settings.resample.code
    (10, 0)
    """
    merged = {p.name: p.default_value for p in PARAMETERS}
    items = values.items() if isinstance(values, Mapping) else (values or ())
    for name, value in items:
        parameter = lookup(name)
        merged[parameter.name] = parameter.default_value if value is None else parameter.convert(value)
    return Settings(merged)


def format_value(value: Any) -> str:
    """A value as EsoRex writes it in a config file and its help: TRUE/FALSE; a real number
    in %g form with the fewest digits (at least 3) that give it back, with ".0" when that
    has neither a point nor an exponent (5000 -> 5e+03, 250 -> 250.0, 12345 -> 12345.0); the text."""
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        digits = next(p for p in range(1, 18) if float(f"{value:.{p}g}") == value)
        text = f"{value:.{max(digits, 3)}g}"
        return text if any(c in text for c in ".e") else text + ".0"
    return str(value)


def config_text(settings: Mapping[str, Any] | None = None) -> str:
    """An EsoRex-style recipe configuration (``muse.muse_twilight.name=value`` lines)."""
    values = settings or {p.name: p.default for p in PARAMETERS}
    blocks = [f"# Configuration of {RECIPE} (musetwilight), EsoRex format\n"]
    for parameter in PARAMETERS:
        allowed = f" <{' | '.join(parameter.alternatives)}>" if parameter.choices else ""
        comment = textwrap.fill(parameter.help + allowed, width=77, initial_indent="# ",
                                subsequent_indent="# ")
        blocks.append(f"# --{parameter.name}\n{comment}\n"
                      f"{parameter.fullname}={format_value(values[parameter.name])}\n")
    return "\n".join(blocks)


def read_config(path: str) -> dict[str, Any]:
    """Typed parameter values from an EsoRex-style configuration file (validated)."""
    values: dict[str, Any] = {}
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            content = line.split("#", 1)[0].strip()
            if not content:
                continue
            name, sep, value = content.partition("=")
            if not sep:
                raise ParameterError(f"{path}, line {number}: expected name=value, found {content!r}")
            try:
                parameter = lookup(name.strip())
                values[parameter.name] = parameter.convert(value.strip())
            except ParameterError as err:
                raise ParameterError(f"{path}, line {number}: {err}") from None
    return values
