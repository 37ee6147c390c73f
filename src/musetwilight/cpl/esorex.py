"""python-cpl's ``cpl.esorex``: EsoRex's SOF and rc files, and its terminal and file logging.

As in python-cpl 0.7.4: :func:`load_sof` gives ``{tag: file or [files]}`` (blank lines
and lines starting with ``#`` skipped, no path handling), :func:`load_rc` gives
``{full name: value text}`` (default ``~/.esorex/esorex.rc``, which must exist), and
:func:`init` takes the recipe path and the logging set-up from an esorex.rc.  ``msg``
is the terminal handler on the root logger (off by default), ``log`` the file handler
(level INFO, opened when ``log.filename`` is set, closed by setting it to None).  The
recipe's messages reach them as records of the loggers ``cpl.muse_twilight.<function>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import IO, Any

LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "WARN": logging.WARNING,
          "ERROR": logging.ERROR, "OFF": logging.CRITICAL + 1}
DEFAULT_RC = "~/.esorex/esorex.rc"


def _lines(source: str | IO[str] | Iterable[str]) -> Iterable[str]:
    """A file name (if it exists), the text itself, or an open file / iterable of lines."""
    if isinstance(source, str):
        if os.path.exists(source):
            with open(source) as handle:
                return handle.read().split("\n")
        return source.split("\n")
    return source


def load_sof(source: str | IO[str] | Iterable[str]) -> dict[str, str | list[str]]:
    """An EsoRex SOF as ``{tag: file}``, several files of one tag as a list (python-cpl's rules)."""
    frames: dict[str, Any] = {}
    for line in _lines(source):
        if not line or line.startswith("#"):
            continue
        words = line.split()
        name, tag = words[0], words[1]
        if tag not in frames:
            frames[tag] = name
        elif isinstance(frames[tag], list):
            frames[tag].append(name)
        else:
            frames[tag] = [frames[tag], name]
    return frames


def load_rc(source: str | IO[str] | Iterable[str] | None = None) -> dict[str, str]:
    """An EsoRex configuration file as ``{full parameter name: value text}``."""
    if source is None:
        source = os.path.expanduser(DEFAULT_RC)
        if not os.path.exists(source):
            raise FileNotFoundError(2, "No such file or directory", source)
    values = {}
    for line in _lines(source):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        if name and value:
            values[name.strip()] = value.strip()
    return values


def init(source: str | IO[str] | Iterable[str] | None = None) -> None:
    """Recipe path, terminal and file logging from an esorex.rc (default ``~/.esorex/esorex.rc``)."""
    from . import Recipe

    rc = load_rc(source)
    if "esorex.caller.recipe-dir" in rc:
        Recipe.path = rc["esorex.caller.recipe-dir"].split(":")
    if "esorex.caller.msg-level" in rc:
        msg.level = rc["esorex.caller.msg-level"]
    if "esorex.caller.log-level" in rc:
        log.level = rc["esorex.caller.log-level"]
    if "esorex.caller.log-dir" in rc:
        log.dir = rc["esorex.caller.log-dir"]
    if "esorex.caller.log-file" in rc:
        log.filename = rc["esorex.caller.log-file"]


class CplLogger:
    """The terminal handler: ``level`` (a name or number; OFF removes it), ``format``,
    ``time``, ``threadid``, ``component``."""

    DEBUG, INFO, WARN, ERROR, OFF = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                     logging.CRITICAL + 1)

    def __init__(self) -> None:
        self.handler: logging.Handler | None = None
        self.dir: str | None = None
        self._time = self._threadid = self._component = False
        self._format: str | None = None
        self.format = None
        self._level = self.OFF

    def _new_handler(self) -> logging.Handler | None:
        return logging.StreamHandler()

    def _open(self) -> None:
        if self.handler is None:
            self.handler = self._new_handler()
            if self.handler is not None:
                self.handler.setLevel(self._level)
                self.handler.setFormatter(logging.Formatter(self.format, "%H:%M:%S"))
                logging.getLogger().addHandler(self.handler)

    def _close(self) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None

    @property
    def level(self) -> int:
        return self._level

    @level.setter
    def level(self, level: int | str) -> None:
        number = LEVELS[level.upper()] if isinstance(level, str) else int(level)
        if number == self.OFF:
            self._close()
        else:
            self._open()
            logging.getLogger().setLevel(logging.DEBUG)
            logging.getLogger("cpl").setLevel(logging.NOTSET)  # the handlers' levels decide, not an earlier setting
            if self.handler is not None:
                self.handler.setLevel(number)
        self._level = number

    @property
    def format(self) -> str:
        return self._format or ""

    @format.setter
    def format(self, fmt: str | None) -> None:
        if fmt is None:
            fmt = ("%(asctime)s " if self._time else "") + "[%(levelname)7s]"
            fmt += "[%(threadName)s] " if self._threadid else " "
            fmt += ("%(name)s: " if self._component else "") + "%(message)s"
        self._format = fmt
        if self.handler is not None:
            self.handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))

    def _flag(name: str):  # type: ignore[misc]
        def get(self) -> bool:
            return getattr(self, "_" + name)

        def set_(self, enable: bool) -> None:
            setattr(self, "_" + name, bool(enable))
            self.format = None
        return property(get, set_)

    time = _flag("time")
    threadid = _flag("threadid")
    component = _flag("component")
    del _flag


class CplFileLogger(CplLogger):
    """The log file handler: ``filename`` (in ``dir``) opens it, None closes it; level INFO,
    with time, thread and component."""

    def __init__(self) -> None:
        super().__init__()
        self._filename: str | None = None
        self.time = self.threadid = self.component = True
        self.level = self.INFO

    def _new_handler(self) -> logging.Handler | None:
        if not self._filename:
            return None
        return logging.FileHandler(os.path.join(self.dir, self._filename) if self.dir else self._filename)

    @property
    def filename(self) -> str | None:
        return self._filename

    @filename.setter
    def filename(self, name: str | None) -> None:
        if name != self._filename:
            self._close()
            self._filename = name
            self._open()


msg = CplLogger()
log = CplFileLogger()
