"""A python-cpl compatible interface to musetwilight's muse_twilight.

Code written for python-cpl switches backends by changing only the import::

    from musetwilight import cpl
    muse_twilight = cpl.Recipe("muse_twilight")
    muse_twilight.param.overscan = "vpoly"
    muse_twilight.calib.MASTER_BIAS = "MASTER_BIAS.fits"
    res = muse_twilight(["SKYFLAT1.fits", "SKYFLAT2.fits", "SKYFLAT3.fits"],
                        param={"ovscreject": "dcr"})
    res.TWILIGHT_CUBE.writeto("TWILIGHT_CUBE.fits")

Inputs are file names or ``astropy.io.fits.HDUList`` objects (or lists of them);
results are HDULists, or file names when ``output_dir`` is given, as in python-cpl.
``cpl.esorex`` (SOF and rc files, terminal and file logging), ``Recipe.path``,
``Recipe.list()``, versions, ``threaded`` calls and ``env`` work as in python-cpl 0.7.4;
every failure of a call, a bad parameter value included, raises :class:`CplError`.
"""

from __future__ import annotations

import builtins
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from astropy.io import fits

from .. import __version__
from .. import params as _params
from ..errors import MuseTwilightError, os_error_text
from ..io import outdir
from ..io.frames import RULES_BY_TAG, make_frameset
from ..io.products import PRODUCT_TAGS
from . import esorex as esorex

_log = logging.getLogger("musetwilight.cpl")
RECIPES = ("muse_twilight",)
ESO_VERSION = (20807, "2.8.7")  # the ESO muse_twilight this implements (python-cpl's Recipe.version)
RAW_TAGS = ["SKYFLAT", "ILLUM"]
CALIB_TAGS = [rule.tag for rule in RULES_BY_TAG.values() if rule.group == "calib"]


class CplError(Exception):
    """The recipe stopped with an error; ``log`` holds its messages."""

    def __init__(self, msg: str, log: LogList | None = None, code: int = 1):
        super().__init__(msg)
        self.msg, self.code, self.log = msg, code, log or LogList()
        self.filename, self.line, self.function = None, None, None
        self.next = None


class CplValueError(CplError, ValueError):
    """A bad parameter value: a CplError, and the ValueError python-cpl raises for it."""


class RecipeCrash(Exception):
    """Raised by python-cpl when the C recipe crashes; kept for compatible ``except`` clauses."""


class Parameter:
    """One recipe parameter: ``name``, ``fullname``, ``default``, ``value`` (None = default)."""

    def __init__(self, declaration: _params.Parameter):
        self._declaration = declaration
        self._value = None

    name = property(lambda self: self._declaration.name)
    fullname = property(lambda self: self._declaration.fullname)
    context = property(lambda self: _params.CONTEXT)
    default = property(lambda self: self._declaration.default)
    type = property(lambda self: self._declaration.type)
    range = property(lambda self: None)
    sequence = property(lambda self: list(self._declaration.alternatives) or None)
    __doc__ = property(lambda self: self._declaration.help)

    @property
    def value(self) -> Any:
        """The value set (as text for the string parameters, as python-cpl gives it), None = default."""
        if isinstance(self._value, (_params.OverscanSpec, _params.RejectSpec, str)):
            return str(self._value)
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        try:
            self._value = None if value is None else self._declaration.convert(value)
        except MuseTwilightError as err:
            raise CplValueError(str(err)) from None

    @value.deleter
    def value(self) -> None:
        self._value = None

    def __str__(self) -> str:
        return f"{self.value if self._value is not None else self.default}"

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, default={self.default!r}, value={self._value!r})"


class ParameterList:
    """The recipe's parameters as attributes (``param.xorder = 3``; ``del param.xorder``)."""

    _items: dict[str, Parameter]

    def __init__(self, source: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_items", {p.name: Parameter(p) for p in _params.PARAMETERS})
        if source:
            for key, value in source.items():
                self[key] = value

    def _get(self, key: str) -> Parameter:
        try:
            return self._items[_params.lookup(key).name]
        except _params.ParameterError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[Parameter]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        try:
            self._get(key)
        except KeyError:
            return False
        return True

    def __getitem__(self, key: str) -> Parameter:
        return self._get(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._get(key).value = value

    def __delitem__(self, key: str) -> None:
        del self._get(key).value

    def _attribute(self, key: str) -> Parameter:
        try:
            return self._get(key)
        except KeyError:
            raise AttributeError(f"muse_twilight has no parameter {key!r}") from None

    def __getattr__(self, key: str) -> Parameter:
        return self._attribute(key)

    def __setattr__(self, key: str, value: Any) -> None:
        self._attribute(key).value = value

    def __delattr__(self, key: str) -> None:
        del self._attribute(key).value

    def __dir__(self):
        return list(self._items)

    def __repr__(self) -> str:
        return repr({p.name: p.value for p in self})

    def values(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Parameter values in force: set values, overridden by ``overrides``."""
        merged = {p.name: p.value for p in self if p.value is not None}
        for key, value in (overrides or {}).items():
            merged[_params.lookup(key).name] = value
        return merged


class FrameSlot:
    """The frames of one calibration tag (``tag``, ``min``, ``max``, ``frames``)."""

    def __init__(self, tag: str):
        rule = RULES_BY_TAG[tag]
        self.tag, self.min, self.max = tag, rule.minimum or None, rule.maximum
        self.frames: Any = None

    def __repr__(self) -> str:
        return f"FrameSlot({self.tag!r}, {self.frames!r})"


class FrameList:
    """Calibration frames as attributes (``calib.MASTER_BIAS = "bias.fits"``)."""

    def __init__(self, source: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_slots", {tag: FrameSlot(tag) for tag in CALIB_TAGS})
        for tag, frames in (source or {}).items():
            if tag not in self._slots:
                raise KeyError(tag)  # as python-cpl, also for a raw tag
            self._slots[tag].frames = frames

    def __iter__(self) -> Iterator[FrameSlot]:
        return iter(self._slots.values())

    def __getattr__(self, tag: str) -> Any:
        try:
            return self._slots[tag].frames
        except KeyError:
            raise AttributeError(f"muse_twilight has no calibration tag {tag!r}") from None

    def __setattr__(self, tag: str, frames: Any) -> None:
        if tag not in self._slots:
            raise AttributeError(f"muse_twilight has no calibration tag {tag!r} "
                                 f"(known: {', '.join(CALIB_TAGS)})")
        self._slots[tag].frames = frames

    def __delattr__(self, tag: str) -> None:
        self.__setattr__(tag, None)

    def __getitem__(self, tag: str) -> Any:
        return self.__getattr__(tag)

    def __setitem__(self, tag: str, frames: Any) -> None:
        self.__setattr__(tag, frames)

    def as_dict(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        merged = {slot.tag: slot.frames for slot in self if slot.frames is not None}
        merged.update(overrides or {})
        return {tag: frames for tag, frames in merged.items() if frames is not None}


class LogList(list):
    """Captured log records with python-cpl's ``error`` / ``warning`` / ``info`` / ``debug`` views."""

    def _at_least(self, level: int) -> builtins.list[str]:
        return [record.getMessage() for record in self if record.levelno >= level]

    error = property(lambda self: self._at_least(logging.ERROR))
    warning = property(lambda self: self._at_least(logging.WARNING))
    info = property(lambda self: self._at_least(logging.INFO))
    debug = property(lambda self: self._at_least(logging.DEBUG))


class _Capture(logging.Handler):
    def __init__(self, records: LogList, forward: logging.Logger):
        super().__init__(logging.DEBUG)
        self.records, self.forward = records, forward

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.forward.isEnabledFor(record.levelno):
            name = f"{self.forward.name}.{record.funcName}"
            self.forward.handle(logging.makeLogRecord({**record.__dict__, "name": name}))


class Stat:
    """Run statistics as python-cpl reports them."""

    def __init__(self, user_time: float, sys_time: float, wall_time: float):
        self.return_code = 0
        self.user_time, self.sys_time, self.wall_time = user_time, sys_time, wall_time
        self.memory_is_empty = None


class Result:
    """Products of one call: one attribute per product tag (HDUList, or file name with output_dir)."""

    def __init__(self, directory: Path, products: dict[str, Any], log: LogList, stat: Stat):
        self.dir = str(directory)
        self.tags = set(products)
        self.log = log
        self.stat = stat
        self.__dict__.update(products)

    def __getitem__(self, tag: str) -> Any:
        if tag not in self.tags:
            raise KeyError(tag)
        return self.__dict__[tag]

    def __contains__(self, tag: str) -> bool:
        return tag in self.tags

    def __iter__(self):
        return ((tag, self.__dict__[tag]) for tag in sorted(self.tags))

    def __len__(self) -> int:
        return len(self.tags)


class Recipe:
    """python-cpl's ``cpl.Recipe`` for muse_twilight, running musetwilight.

    Parameters
    ----------
    name : str
        The recipe, ``"muse_twilight"``.
    filename, version, threaded
        As python-cpl's (accepted; musetwilight has one implementation of the recipe).

    Examples
    --------
    >>> from musetwilight import cpl                                     # doctest: +SKIP
    >>> recipe = cpl.Recipe("muse_twilight")
    >>> recipe.param.resample = "nearest"
    >>> recipe.calib.MASTER_BIAS = "MASTER_BIAS.fits"    # and the other calibrations
    >>> result = recipe(["SKYFLAT_1.fits", "SKYFLAT_2.fits", "SKYFLAT_3.fits"])
    >>> result.TWILIGHT_CUBE[0].header["ESO PRO CATG"]
    'TWILIGHT_CUBE'
    """

    path: str | list[str] = ["/usr/lib/x86_64-linux-gnu/cpl/plugins", "/usr/lib/cpl/plugins"]
    temp_dir = tempfile.gettempdir()
    memory_mode = 0
    _maxthreads: int | None = None

    def __init__(self, name: str, filename: str | None = None, version: str | int | None = None,
                 threaded: bool = False):
        if name not in RECIPES:
            raise OSError(f"Recipe {name!r} not found: musetwilight provides {', '.join(RECIPES)}")
        if version is not None and version not in ESO_VERSION:
            raise OSError(f"wrong version {ESO_VERSION} (requested {version}) for {name}")
        self.__name__ = name
        self.name = name
        self.filename = filename
        self.threaded = threaded
        self.mtrace = False
        self.memory_dump = 0
        self._tag = "SKYFLAT"
        self.output_dir: str | None = None
        self.env: dict[str, str] = {}
        self._param = ParameterList()
        self._calib = FrameList()

    @staticmethod
    def list() -> builtins.list[tuple[str, builtins.list[str]]]:
        """The recipes available and their versions, as python-cpl lists them."""
        return [(name, [ESO_VERSION[1]]) for name in RECIPES]

    @staticmethod
    def get_recipefilename(name: str, version: str | int | None = None) -> str | None:
        """Where the recipe is implemented (None for a recipe musetwilight does not provide)."""
        from .. import recipe

        if name not in RECIPES or (version is not None and version not in ESO_VERSION):
            return None
        return recipe.__file__

    @staticmethod
    def get_libs() -> builtins.list[str]:
        """python-cpl's recipe libraries: none (the recipe is Python)."""
        return []

    @staticmethod
    def set_maxthreads(n: int) -> None:
        """Most IFUs reduced at once by later calls (python-cpl: the recipe's threads)."""
        Recipe._maxthreads = max(1, int(n))

    __file__ = property(lambda self: self.get_recipefilename(self.__name__))
    cpl_version = property(lambda self: f"musetwilight {__version__}")
    version = property(lambda self: ESO_VERSION)
    __version__ = property(lambda self: ESO_VERSION[1])
    __author__ = "musetwilight developers"
    __email__ = ""
    __copyright__ = "BSD-3-Clause"
    description = property(lambda self: ("Combine several twilight skyflats into one cube, compute correction "
                                         "factors for each IFU, and create a smooth 3D illumination correction.",
                                         ""))

    @property
    def tags(self) -> builtins.list[str]:
        return list(RAW_TAGS)

    @property
    def tag(self) -> str:
        return self._tag

    @tag.setter
    def tag(self, value: str) -> None:
        if value not in RAW_TAGS:
            raise KeyError(f"Tag {value!r} not in {RAW_TAGS}")
        self._tag = value

    @property
    def param(self) -> ParameterList:
        return self._param

    @param.setter
    def param(self, source: Mapping[str, Any] | None) -> None:
        self._param = ParameterList(source)

    @param.deleter
    def param(self) -> None:
        self._param = ParameterList()

    @property
    def calib(self) -> FrameList:
        return self._calib

    @calib.setter
    def calib(self, source: Mapping[str, Any] | str | None) -> None:
        if isinstance(source, (str, os.PathLike)):
            from ..io.frames import parse_sof

            grouped: dict[str, list[str]] = {}
            for frame in parse_sof(source):
                grouped.setdefault(frame.tag, []).append(str(frame.path))
            source = {tag: files[0] if len(files) == 1 else files for tag, files in grouped.items()}
        self._calib = FrameList(source)

    @calib.deleter
    def calib(self) -> None:
        self._calib = FrameList()

    @property
    def output(self) -> dict[str, builtins.list[str]]:
        return {"SKYFLAT": list(PRODUCT_TAGS), "ILLUM": []}

    def __repr__(self) -> str:
        return f"Recipe({self.__name__!r}, version={__version__!r})"

    def __call__(self, *data: Any, **ndata: Any) -> Result | ThreadedResult:
        """Run the recipe (python-cpl's keywords: raw, tag, param, calib, output_dir, env, loglevel,
        logname, threaded); ``threaded`` returns at once a result whose attributes wait for the run."""
        if ndata.pop("threaded", self.threaded):
            return ThreadedResult(lambda: self._run(data, ndata))
        return self._run(data, ndata)

    def _run(self, data: tuple, ndata: dict) -> Result:
        from .. import recipe

        tag = ndata.get("tag", self.tag)
        raw = _raw_frames(data, ndata.get("raw"), tag)
        if not raw:
            raise CplValueError("No raw frames specified.")
        calib = self.calib.as_dict(ndata.get("calib"))
        try:
            settings = _params.make_settings(self.param.values(ndata.get("param")))
        except MuseTwilightError as err:
            raise CplValueError(str(err)) from None
        output_dir = ndata.get("output_dir", self.output_dir)
        try:
            run_dir = outdir.make_directory(output_dir) if output_dir else \
                Path(tempfile.mkdtemp(dir=self.temp_dir, prefix=self.__name__ + "-"))
        except OSError as err:
            raise CplError(os_error_text(err)) from err
        environ = dict(os.environ)
        environ.update(self.env)
        environ.update(ndata.get("env", {}))
        records = LogList()
        forward = logging.getLogger(ndata.get("logname", f"cpl.{self.__name__}"))
        if ndata.get("loglevel") is not None:
            forward.setLevel(ndata["loglevel"])
        capture = _Capture(records, forward)
        package_logger = logging.getLogger("musetwilight")
        package_logger.addHandler(capture)
        previous_level, previous_propagate = package_logger.level, package_logger.propagate
        package_logger.setLevel(logging.DEBUG)
        package_logger.propagate = False  # the records reach the root logger as cpl.muse_twilight.<function> only
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        inputs_dir = Path(tempfile.mkdtemp(dir=run_dir, prefix="inputs-"))
        try:
            entries = []
            for frame_tag, frames in list(raw.items()) + list(calib.items()):
                for index, frame in enumerate(frames if isinstance(frames, (list, tuple)) else [frames]):
                    entries.append((_as_path(frame, inputs_dir, f"{frame_tag}_{index}"), frame_tag))
            _log.debug("%d input frames:", len(entries))
            for path, frame_tag in entries:
                _log.debug("  %s\t%s", path, frame_tag)
            result = recipe.run(make_frameset(entries), settings, run_dir, environ=environ,
                                workers=Recipe._maxthreads)
        except (MuseTwilightError, OSError) as err:
            forward.error("%s", os_error_text(err))
            raise CplError(os_error_text(err), records) from err
        finally:
            package_logger.removeHandler(capture)
            package_logger.setLevel(previous_level)
            package_logger.propagate = previous_propagate
            shutil.rmtree(inputs_dir, ignore_errors=True)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stat = Stat(usage.ru_utime - usage_before.ru_utime, usage.ru_stime - usage_before.ru_stime,
                    time.perf_counter() - start)
        products: dict[str, Any] = {}
        for name, path in result.paths.items():
            if output_dir:
                products[name] = str(path)
            else:
                with fits.open(path) as hdul:
                    products[name] = fits.HDUList([hdu.copy() for hdu in hdul])
        if not output_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        return Result(run_dir, products, records, stat)


class ThreadedResult:
    """A call running in a thread (python-cpl's ``threaded=True``): any attribute, item or
    ``join()`` waits for it and gives its Result's, or raises its error."""

    def __init__(self, work):
        self._outcome: list = []
        self._thread = threading.Thread(target=self._work, args=(work,), daemon=True)
        self._thread.start()

    def _work(self, work) -> None:
        try:
            self._outcome.append(work())
        except BaseException as err:  # noqa: BLE001 -- handed to the waiting caller
            self._outcome.append(err)

    def join(self) -> Result:
        self._thread.join()
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self.join(), name)

    def __getitem__(self, tag: str) -> Any:
        return self.join()[tag]


def _raw_frames(data: tuple, raw: Any, tag: str) -> dict[str, list]:
    """python-cpl's raw-frame rules: positional frames get ``tag``; a dict maps tags to frames."""
    frames: dict[str, list] = {}
    items = list(data) + ([raw] if raw is not None else [])
    for item in items:
        if isinstance(item, dict):
            for key, value in item.items():
                frames.setdefault(key, []).extend(value if isinstance(value, (list, tuple)) else [value])
        elif isinstance(item, (list, tuple)) and not isinstance(item, fits.HDUList):
            frames.setdefault(tag, []).extend(item)
        else:
            frames.setdefault(tag, []).append(item)
    return {key: value for key, value in frames.items() if value}


def _as_path(frame: Any, directory: Path, stem: str) -> Path:
    """A file name for an input given as a path or an HDUList (written to ``directory``)."""
    if isinstance(frame, fits.HDUList):
        path = directory / f"{stem}.fits"
        frame.writeto(path, overwrite=True)
        return path
    return Path(frame)
