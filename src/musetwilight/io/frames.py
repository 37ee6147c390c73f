"""Set-of-frames (SOF) parsing and classification of input frames by tag.

An SOF file has one ``path TAG [GROUP]`` line per input file, read as EsoRex 3.13 reads
it: lines whose first non-blank character is ``#`` and blank lines are skipped, fields
are separated by blanks, words after the third are ignored, and the group column is
ignored (muse_twilight classifies frames by tag).  Relative paths are relative to the
current directory (not the SOF's folder), a path starting with ``$`` has its
``$NAME``/``${NAME}`` variables expanded (unset ones to nothing), ``~`` is not expanded.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagRule:
    """What muse_twilight accepts for one frame tag."""

    tag: str
    group: str  # "raw" or "calib"
    minimum: int
    maximum: int | None
    description: str


TAG_RULES: tuple[TagRule, ...] = (
    TagRule("SKYFLAT", "raw", 3, None, "Raw twilight skyflat"),
    TagRule("ILLUM", "raw", 0, 1, "Single optional raw (attached/illumination) flat-field exposure"),
    TagRule("MASTER_BIAS", "calib", 1, 1, "Master bias"),
    TagRule("MASTER_DARK", "calib", 0, 1, "Master dark"),
    TagRule("MASTER_FLAT", "calib", 1, 1, "Master flat"),
    TagRule("BADPIX_TABLE", "calib", 0, None, "Known bad pixels"),
    TagRule("TRACE_TABLE", "calib", 1, 1, "Tracing table for all slices"),
    TagRule("WAVECAL_TABLE", "calib", 1, 1, "Wavelength calibration table"),
    TagRule("GEOMETRY_TABLE", "calib", 1, 1, "Relative positions of the slices in the field of view"),
    TagRule("VIGNETTING_MASK", "calib", 0, 1, "Mask to mark vignetted regions in the MUSE field of view"),
)
RULES_BY_TAG = {rule.tag: rule for rule in TAG_RULES}


@dataclass(frozen=True)
class Frame:
    """One input file with its tag."""

    path: Path
    tag: str

    @property
    def group(self) -> str:
        return RULES_BY_TAG[self.tag].group


@dataclass
class FrameSet:
    """Input frames of one recipe run, grouped by tag in SOF order."""

    frames: list[Frame] = field(default_factory=list)

    def __iter__(self):
        return iter(self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    def by_tag(self, tag: str) -> list[Frame]:
        return [f for f in self.frames if f.tag == tag]

    def paths(self, tag: str) -> list[Path]:
        return [f.path for f in self.by_tag(tag)]

    def single(self, tag: str) -> Path | None:
        """The one file of ``tag``, or None when the tag is absent (validation checks counts)."""
        paths = self.paths(tag)
        return paths[0] if paths else None

    def required(self, tag: str) -> Path:
        """The one file of ``tag``, which the frame set must have (:func:`validate_frameset`)."""
        path = self.single(tag)
        if path is None:
            raise InputError(f"no {tag} in the input frames")
        return path

    @property
    def raw(self) -> list[Frame]:
        return [f for f in self.frames if f.group == "raw"]

    @property
    def calib(self) -> list[Frame]:
        return [f for f in self.frames if f.group == "calib"]


SOF_LINE_LIMIT = 1023  # EsoRex reads at most this many characters of a line (fgets)
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def expand_sof_path(text: str, where: str, environ: Mapping[str, str] | None = None) -> str:
    """A SOF path as EsoRex's ``wordexp`` sees it: variables expanded when it starts with ``$``."""
    if not text.startswith("$"):
        return text
    if "$(" in text or "`" in text:
        raise InputError(f"{where}: command substitution in {text!r} is not supported")
    env = os.environ if environ is None else environ
    return _VARIABLE.sub(lambda m: env.get(m["braced"] or m["plain"], ""), text)


def parse_sof(paths: str | os.PathLike | Sequence[str | os.PathLike], unknown_tags: str = "error") -> FrameSet:
    """Read one or several SOF files (concatenated, in order) into a FrameSet.

    ``unknown_tags="error"`` makes a tag muse_twilight does not know (or a line without a
    tag) an InputError naming the line; ``"ignore"`` drops such frames with a warning, as
    EsoRex and ESO's recipe do.  Files are not opened yet.
    """
    sofs = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    entries = []
    for sof in sofs:
        entries.extend(_sof_entries(sof, unknown_tags))
    if not entries:
        raise InputError(f"{', '.join(map(str, sofs))}: the set-of-frames file lists no files")
    return make_frameset(entries)


def _sof_entries(sof: Path, unknown_tags: str) -> list[tuple[Path, str, str]]:
    try:
        data = sof.read_bytes()
    except OSError as err:
        raise InputError(f"{sof}: cannot read the set-of-frames file ({err.strerror})") from None
    if data.startswith(b"SIMPLE  ="):
        raise InputError(f"{sof}: is a FITS file, not a set-of-frames file (one 'path TAG' line per input)")
    entries = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        words = line[:SOF_LINE_LIMIT].split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{sof}, line {number}"
        tag = words[1] if len(words) > 1 else ""
        if tag not in RULES_BY_TAG and unknown_tags == "ignore":
            log.warning("%s: frame %s %s ignored (muse_twilight does not use it)", where, words[0],
                        f"with tag {tag!r}" if tag else "without a tag")
            continue
        if not tag:
            raise InputError(f"{where}: expected 'path TAG', found {line.strip()!r}")
        entries.append((Path(expand_sof_path(words[0], where)), tag, where))
    return entries


def make_frameset(entries: Iterable[tuple[str | os.PathLike, str] | tuple[str | os.PathLike, str, str]]) -> FrameSet:
    """A FrameSet from ``(path, tag[, where])`` tuples; unknown tags are an error."""
    frames = []
    for entry in entries:
        file_path, tag = Path(entry[0]), entry[1]
        where = entry[2] if len(entry) > 2 else str(file_path)
        if tag not in RULES_BY_TAG:
            known = ", ".join(RULES_BY_TAG)
            raise InputError(f"{where}: unknown tag {tag!r} for {file_path} (muse_twilight accepts {known})")
        frames.append(Frame(file_path, tag))
    return FrameSet(frames)


def validate_frameset(frameset: FrameSet, check_files: bool = True) -> None:
    """Check tag counts (as muse_twilight requires) and that every file exists."""
    counts: dict[str, int] = defaultdict(int)
    for frame in frameset:
        counts[frame.tag] += 1
    for rule in TAG_RULES:
        found = counts.get(rule.tag, 0)
        if found < rule.minimum:
            need = "at least" if rule.maximum is None or rule.maximum > rule.minimum else "exactly"
            raise InputError(
                f"muse_twilight needs {need} {rule.minimum} {rule.tag} frame"
                f"{'s' if rule.minimum > 1 else ''}, found {found}"
            )
        if rule.maximum is not None and found > rule.maximum:
            names = ", ".join(str(p) for p in frameset.paths(rule.tag))
            raise InputError(
                f"muse_twilight accepts at most {rule.maximum} {rule.tag} frame"
                f"{'s' if rule.maximum > 1 else ''}, found {found}: {names}"
            )
    if check_files:
        for frame in frameset:
            if not frame.path.is_file():
                raise InputError(f"{frame.path}: {frame.tag} file does not exist")


def write_sof(path: str | os.PathLike, frames: Iterable[tuple[str | os.PathLike, str]]) -> Path:
    """Write an SOF file of ``path TAG`` lines and return its path."""
    sof = Path(path)
    sof.write_text("".join(f"{Path(p)} {tag}\n" for p, tag in frames))
    return sof


@dataclass
class Inputs:
    """The input files of one run, resolved by tag (counts validated)."""

    frames: FrameSet
    skyflats: list[Path]
    illum: Path | None
    bias: Path
    flat: Path
    dark: Path | None
    trace: Path
    wavecal: Path
    geometry: Path
    badpix: list[Path]
    vignetting: Path | None

    @classmethod
    def from_frameset(cls, frames: FrameSet) -> Inputs:
        validate_frameset(frames)
        required = {tag: frames.required(tag) for tag in ("MASTER_BIAS", "MASTER_FLAT", "TRACE_TABLE",
                                                         "WAVECAL_TABLE", "GEOMETRY_TABLE")}
        return cls(frames, frames.paths("SKYFLAT"), frames.single("ILLUM"), required["MASTER_BIAS"],
                   required["MASTER_FLAT"], frames.single("MASTER_DARK"), required["TRACE_TABLE"],
                   required["WAVECAL_TABLE"], required["GEOMETRY_TABLE"], frames.paths("BADPIX_TABLE"),
                   frames.single("VIGNETTING_MASK"))

    def used_raw(self) -> list[tuple[Path, str]]:
        """The raw frames in the order they are processed: the SKYFLATs, then ILLUM."""
        return [(p, "SKYFLAT") for p in self.skyflats] + ([(self.illum, "ILLUM")] if self.illum else [])

    def used_calib(self, with_vignetting: bool, skipped_cube: bool = False) -> list[tuple[Path, str]]:
        """Calibrations a product lists; from an existing cube only the vignetting mask is used."""
        calib = [] if skipped_cube else [(f.path, f.tag) for f in self.frames.calib if f.tag != "VIGNETTING_MASK"]
        if with_vignetting and self.vignetting:
            calib.append((self.vignetting, "VIGNETTING_MASK"))
        return calib
