"""Set-of-frames (SOF) parsing and classification of input frames by tag.

An SOF file has one ``path TAG`` line per input file (EsoRex convention);
``#`` starts a comment, relative paths are relative to the SOF's directory.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError


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

    @property
    def raw(self) -> list[Frame]:
        return [f for f in self.frames if f.group == "raw"]

    @property
    def calib(self) -> list[Frame]:
        return [f for f in self.frames if f.group == "calib"]


def parse_sof(path: str | os.PathLike) -> FrameSet:
    """Read an SOF file into a FrameSet (tags checked, files not yet opened)."""
    sof = Path(path)
    try:
        text = sof.read_text()
    except OSError as err:
        raise InputError(f"{sof}: cannot read the set-of-frames file ({err.strerror})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        words = content.split()
        if len(words) < 2:
            raise InputError(f"{sof}, line {number}: expected 'path TAG', found {content!r}")
        file_path = Path(os.path.expandvars(os.path.expanduser(words[0])))
        if not file_path.is_absolute():
            file_path = sof.parent / file_path
        entries.append((file_path, words[1], f"{sof}, line {number}"))
    if not entries:
        raise InputError(f"{sof}: the set-of-frames file lists no files")
    return make_frameset(entries)


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
        required = {tag: frames.single(tag) for tag in ("MASTER_BIAS", "MASTER_FLAT", "TRACE_TABLE",
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
