"""The 24 muse_twilight recipe parameters, declared once.

Every other part of the package (command line, config files, the python-cpl
facade, the man page, product headers) reads the table ``PARAMETERS``.
Names, types, defaults, allowed values and help texts are those of ESO's
muse_twilight 2.8.7.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

RECIPE = "muse_twilight"
CONTEXT = "muse.muse_twilight"


class ParameterError(ValueError):
    """An invalid recipe parameter name, type or value."""


# ``overscan`` and ``ovscreject`` are free strings in ESO so that options can
# follow the method name ("vpoly:order,frms,fchisq", "dcr:xbox,ybox,npass,frac").
_OVERSCAN_RE = re.compile(r"^(none|offset|vpoly(:[0-9eE.+\-]+(,[0-9eE.+\-]+){0,2})?)$")
_OVSCREJECT_RE = re.compile(r"^(none|(dcr|fit)(:[0-9eE.+\-]+(,[0-9eE.+\-]+)*)?)$")


@dataclass(frozen=True)
class Parameter:
    """Declaration of one recipe parameter."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern | None = None
    check: Callable[[Any], str | None] | None = None
    expert: bool = False

    @property
    def fullname(self) -> str:
        return f"{CONTEXT}.{self.name}"

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", float: "double", str: "string"}[self.type]

    def convert(self, value: Any) -> Any:
        """Return ``value`` as this parameter's type, validated; raise ParameterError."""
        converted = self._coerce(value)
        if self.choices is not None and converted not in self.choices:
            raise ParameterError(
                f"parameter {self.name}: {value!r} is not one of {', '.join(self.choices)}"
            )
        if self.pattern is not None and not self.pattern.match(converted):
            raise ParameterError(f"parameter {self.name}: {value!r} is not valid ({self.help_allowed})")
        if self.check is not None:
            problem = self.check(converted)
            if problem:
                raise ParameterError(f"parameter {self.name}: {value!r} {problem}")
        return converted

    @property
    def help_allowed(self) -> str:
        if self.name == "overscan":
            return "none, offset or vpoly[:order,frms,fchisq]"
        if self.name == "ovscreject":
            return "none, dcr[:xbox,ybox,npass,frac] or fit[:...]"
        return ", ".join(self.choices or ())

    def _coerce(self, value: Any) -> Any:
        t = self.type
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "t", "1", "yes"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "f", "0", "no"):
                return False
            raise ParameterError(f"parameter {self.name}: {value!r} is not a boolean (TRUE or FALSE)")
        if t is int:
            if isinstance(value, bool):
                raise ParameterError(f"parameter {self.name}: {value!r} is not an integer")
            if isinstance(value, int):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    pass
            raise ParameterError(f"parameter {self.name}: {value!r} is not an integer")
        if t is float:
            if isinstance(value, bool):
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
        pattern=_OVERSCAN_RE,
    ),
    Parameter(
        "ovscreject", str, "dcr",
        "This influences how values are rejected when computing overscan statistics. Either no "
        'rejection at all ("none"), rejection using the DCR algorithm ("dcr"), or rejection using '
        'an iterative constant fit ("fit").',
        pattern=_OVSCREJECT_RE,
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
    Parameter("combine", str, "sigclip", "Type of combination to use",
              choices=("average", "median", "minmax", "sigclip")),
    Parameter("nlow", int, 1, "Number of minimum pixels to reject with minmax", check=_nonnegative),
    Parameter("nhigh", int, 1, "Number of maximum pixels to reject with minmax", check=_nonnegative),
    Parameter("nkeep", int, 1, "Number of pixels to keep with minmax", check=_nonnegative),
    Parameter("lsigma", float, 3.0, "Low sigma for pixel rejection with sigclip"),
    Parameter("hsigma", float, 3.0, "High sigma for pixel rejection with sigclip"),
    Parameter("scale", bool, False,
              "Scale the individual images to a common exposure time before combining them."),
    Parameter("resample", str, "drizzle", "The resampling technique to use for the final output cube.",
              choices=("nearest", "linear", "quadratic", "renka", "drizzle", "lanczos")),
    Parameter(
        "crtype", str, "median",
        'Type of statistics used for detection of cosmic rays during final resampling. "iraf" uses '
        'the variance information, "mean" uses standard (mean/stdev) statistics, "median" uses '
        "median and the median median of the absolute median deviation.",
        choices=("iraf", "mean", "median"),
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
        choices=("polyfit", "gaussian", "median"), expert=True,
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
    """A complete, validated set of recipe parameter values (read-only mapping)."""

    values: dict[str, Any] = field(default_factory=lambda: {p.name: p.default for p in PARAMETERS})

    def __post_init__(self) -> None:
        problems = cross_check(self.values)
        if problems:
            raise ParameterError("; ".join(problems))

    def __getitem__(self, key: str) -> Any:
        return self.values[lookup(key).name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __reduce__(self):
        return make_settings, (dict(self.values),)

    def replace(self, **changes: Any) -> "Settings":
        return make_settings({**self.values, **changes})

    def non_default(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if v != BY_NAME[k].default}


def cross_check(values: Mapping[str, Any]) -> list[str]:
    """Problems between parameters that are each valid on their own."""
    problems = []
    if values["lambdamax"] <= values["lambdamin"]:
        problems.append(
            f"lambdamax ({values['lambdamax']}) must be larger than lambdamin ({values['lambdamin']})"
        )
    return problems


def make_settings(values: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> Settings:
    """Validated settings: the defaults, overridden by ``values`` (short or full names)."""
    merged = {p.name: p.default for p in PARAMETERS}
    items = values.items() if isinstance(values, Mapping) else (values or ())
    for name, value in items:
        parameter = lookup(name)
        merged[parameter.name] = parameter.default if value is None else parameter.convert(value)
    return Settings(merged)


def format_value(value: Any) -> str:
    """A value as EsoRex writes it (TRUE/FALSE, plain numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_text(settings: Mapping[str, Any] | None = None) -> str:
    """An EsoRex-style recipe configuration (``muse.muse_twilight.name=value`` lines)."""
    import textwrap

    values = settings or {p.name: p.default for p in PARAMETERS}
    blocks = [f"# Configuration of {RECIPE} (musetwilight), EsoRex format\n"]
    for parameter in PARAMETERS:
        allowed = f" <{' | '.join(parameter.choices)}>" if parameter.choices else ""
        comment = textwrap.fill(parameter.help + allowed, width=77, initial_indent="# ",
                                subsequent_indent="# ")
        blocks.append(f"# --{parameter.name}\n{comment}\n"
                      f"{parameter.fullname}={format_value(values[parameter.name])}\n")
    return "\n".join(blocks)


def read_config(path: str) -> dict[str, Any]:
    """Parameter values from an EsoRex-style configuration file (validated)."""
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
